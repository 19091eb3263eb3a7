//! The control API's HTTP/1.1 request reader: any bytes as what a client
//! sends, read as pipelined requests until the reader stops, each answered
//! into a buffer.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmm::api::http;

fuzz_target!(|data: &[u8]| {
    let mut stream = data;
    let mut buf = Vec::new();
    let mut out = Vec::new();
    // Each request consumes at least its blank line; the cap only bounds
    // an iteration's time.
    for _ in 0..64 {
        match http::read_request(&mut stream, &mut buf) {
            Ok(req) => {
                assert!(req.body.len() <= http::MAX_BODY);
                let _ = http::respond(
                    &mut out,
                    200,
                    &serde_json::json!({"path": req.path}),
                    req.close,
                );
                if req.close {
                    break;
                }
            }
            Err(http::ReadError::Bad(status, why)) => {
                let _ = http::respond_error(&mut out, status, why, true);
                break;
            }
            Err(_) => break,
        }
    }
});
