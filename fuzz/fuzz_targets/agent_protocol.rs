//! keel-agent's vsock protocol: the reader's "is the request complete"
//! check and the request parser on any bytes; a parsed request encodes and
//! parses back to itself.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Fed byte by byte as the reader would see it arrive: once complete,
    // it stays complete.
    let mut complete = false;
    for n in [1, data.len() / 2, data.len()] {
        let now = host_agent::server::complete_json(&data[..n.min(data.len())]);
        assert!(!complete || now, "a complete request became incomplete");
        complete = now;
    }
    if let Ok(req) = host_agent::server::parse_request(data) {
        let _ = req.message.name();
        let text = serde_json::to_vec(&req).expect("requests serialize");
        assert_eq!(host_agent::server::parse_request(&text), Ok(req));
    }
});
