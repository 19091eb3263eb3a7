//! HostOS vsock protocol, version 1: the JSON the guest sends and gets back.
//!
//! Request: `{"sender_cid": <u32>, "message": <Command>}` with serde's
//! externally tagged enum encoding. Response: `{"Ok": <Payload>}` or
//! `{"Err": "<reason>"}`.

use serde::{Deserialize, Serialize};

pub const PROTOCOL_VERSION: HostOsVsockVersion = HostOsVsockVersion {
    major: 1,
    minor: 0,
    patch: 0,
};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    pub sender_cid: u32,
    pub message: Command,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    #[serde(rename = "attach-hsm")]
    AttachHsm,
    #[serde(rename = "detach-hsm")]
    DetachHsm,
    #[serde(rename = "upgrade")]
    Upgrade(UpgradeData),
    #[serde(rename = "notify")]
    Notify(NotifyData),
    #[serde(rename = "start-upgrade-guest-vm")]
    StartUpgradeGuestVm,
    GetVsockProtocol,
    GetHostOSVersion,
}

impl Command {
    /// Short name used in logs and metric labels.
    pub fn name(&self) -> &'static str {
        match self {
            Command::AttachHsm => "attach-hsm",
            Command::DetachHsm => "detach-hsm",
            Command::Upgrade(_) => "upgrade",
            Command::Notify(_) => "notify",
            Command::StartUpgradeGuestVm => "start-upgrade-guest-vm",
            Command::GetVsockProtocol => "GetVsockProtocol",
            Command::GetHostOSVersion => "GetHostOSVersion",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpgradeData {
    pub url: String,
    #[serde(rename = "target-hash")]
    pub target_hash: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NotifyData {
    pub count: u32,
    pub message: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostOsVsockVersion {
    pub major: u32,
    pub minor: u32,
    pub patch: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Payload {
    HostOSVsockVersion(HostOsVsockVersion),
    HostOSVersion(String),
    NoPayload,
}

pub type Response = Result<Payload, String>;

pub fn encode_response(r: &Response) -> String {
    serde_json::to_string(r).expect("responses always serialize")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(json: &str) -> Request {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn requests_decode_as_hostos_sends_them() {
        assert_eq!(
            req(r#"{"sender_cid":3,"message":"GetVsockProtocol"}"#).message,
            Command::GetVsockProtocol
        );
        assert_eq!(
            req(r#"{"sender_cid":3,"message":"GetHostOSVersion"}"#).message,
            Command::GetHostOSVersion
        );
        assert_eq!(
            req(r#"{"sender_cid":3,"message":"attach-hsm"}"#).message,
            Command::AttachHsm
        );
        assert_eq!(
            req(r#"{"sender_cid":3,"message":"detach-hsm"}"#).message,
            Command::DetachHsm
        );
        assert_eq!(
            req(r#"{"sender_cid":3,"message":"start-upgrade-guest-vm"}"#).message,
            Command::StartUpgradeGuestVm
        );
        assert_eq!(
            req(
                r#"{"sender_cid":3,"message":{"upgrade":{"url":"https://x/u","target-hash":"ab"}}}"#
            )
            .message,
            Command::Upgrade(UpgradeData {
                url: "https://x/u".into(),
                target_hash: "ab".into()
            })
        );
        assert_eq!(
            req(r#"{"sender_cid":3,"message":{"notify":{"count":2,"message":"hi"}}}"#).message,
            Command::Notify(NotifyData {
                count: 2,
                message: "hi".into()
            })
        );
        for bad in [
            r#"{"sender_cid":3,"message":"set-node-id"}"#,
            r#"{"sender_cid":-1,"message":"attach-hsm"}"#,
            r#"{"sender_cid":"3","message":"attach-hsm"}"#,
            r#"{"message":"attach-hsm"}"#,
            r#"{"sender_cid":3,"message":{"notify":{"count":-1,"message":"x"}}}"#,
        ] {
            assert!(serde_json::from_str::<Request>(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn responses_encode_exactly() {
        assert_eq!(
            encode_response(&Ok(Payload::NoPayload)),
            r#"{"Ok":"NoPayload"}"#
        );
        assert_eq!(
            encode_response(&Ok(Payload::HostOSVersion("1.2.3".into()))),
            r#"{"Ok":{"HostOSVersion":"1.2.3"}}"#
        );
        assert_eq!(
            encode_response(&Ok(Payload::HostOSVsockVersion(PROTOCOL_VERSION))),
            r#"{"Ok":{"HostOSVsockVersion":{"major":1,"minor":0,"patch":0}}}"#
        );
        assert_eq!(encode_response(&Err("no".into())), r#"{"Err":"no"}"#);
    }
}
