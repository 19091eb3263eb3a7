//! keel-agent's vsock protocol: the reader's "is the request complete"
//! check and the request parser on any bytes; a request that parses is
//! complete, and encodes and parses back to itself.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The reader's check on what may have arrived so far (no property
    // across prefixes: "1" is a complete value, "1e" an unfinished one).
    for n in [1, data.len() / 2] {
        let _ = host_agent::server::complete_json(&data[..n.min(data.len())]);
    }
    if let Ok(req) = host_agent::server::parse_request(data) {
        // A request the parser takes is one the reader stops at.
        assert!(host_agent::server::complete_json(data));
        let _ = req.message.name();
        let text = serde_json::to_vec(&req).expect("requests serialize");
        assert_eq!(host_agent::server::parse_request(&text), Ok(req));
    }
});
