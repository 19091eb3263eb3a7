//! keel-agent's vsock protocol: the reader's framer ("is the request
//! complete") and the request parser on any bytes. Feeding the framer in
//! pieces gives the same answer as feeding it at once, each byte is scanned
//! at most once, a request that parses is complete, and it encodes and
//! parses back to itself.
#![no_main]

use host_agent::json_frame::JsonFrame;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut whole = JsonFrame::default();
    let done = whole.feed(data);
    assert!(whole.scanned() <= data.len());
    let split = data.len() / 2;
    let mut pieces = JsonFrame::default();
    let first = pieces.feed(&data[..split]);
    let second = pieces.feed(&data[split..]);
    assert_eq!(first || second, done);
    assert_eq!(pieces.scanned(), whole.scanned());
    if let Ok(req) = host_agent::server::parse_request(data) {
        // A request the parser takes is one the reader stops at.
        assert!(done);
        let _ = req.message.name();
        let text = serde_json::to_vec(&req).expect("requests serialize");
        assert_eq!(host_agent::server::parse_request(&text), Ok(req));
    }
});
