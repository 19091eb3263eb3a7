//! Where a JSON request ends, found in one pass: a request read in many
//! small pieces is scanned once, byte by byte, instead of being parsed
//! again from its start after every read (which is quadratic in its size).
//!
//! The scanner follows strings (with escapes) and the nesting of objects
//! and arrays only; it does not validate. The request is complete when its
//! first value has closed: an object or array back at depth 0, or a
//! top-level string's closing quote. Bytes that can never start a valid
//! request (a bare number or word, a stray closing bracket) end it at once,
//! so that the parser reports them.

/// The state of the scan over the bytes fed so far.
#[derive(Debug, Default)]
pub struct JsonFrame {
    depth: u32,
    in_string: bool,
    escaped: bool,
    started: bool,
    complete: bool,
    scanned: usize,
}

impl JsonFrame {
    /// Scans `bytes`, the next piece of the request; returns whether the
    /// first value is now complete (or can never become valid).
    pub fn feed(&mut self, bytes: &[u8]) -> bool {
        for &b in bytes {
            if self.complete {
                break;
            }
            self.scanned = self.scanned.saturating_add(1);
            self.step(b);
        }
        self.complete
    }

    /// Bytes looked at so far, in all calls (each byte at most once).
    pub fn scanned(&self) -> usize {
        self.scanned
    }

    fn step(&mut self, b: u8) {
        if self.in_string {
            match (self.escaped, b) {
                (true, _) => self.escaped = false,
                (false, b'\\') => self.escaped = true,
                (false, b'"') => {
                    self.in_string = false;
                    self.complete = self.depth == 0;
                }
                _ => {}
            }
            return;
        }
        match b {
            b' ' | b'\t' | b'\n' | b'\r' => {}
            b'"' => {
                self.started = true;
                self.in_string = true;
            }
            b'{' | b'[' => {
                self.started = true;
                self.depth = self.depth.saturating_add(1);
            }
            b'}' | b']' => {
                // A closer with nothing open is an error: done.
                self.depth = self.depth.saturating_sub(1);
                self.complete = self.depth == 0;
            }
            // Numbers, literals, commas and colons inside a value.
            _ if self.started && self.depth > 0 => {}
            // Anything else at the top level cannot begin a request.
            _ => self.complete = true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn complete(bytes: &[u8]) -> bool {
        JsonFrame::default().feed(bytes)
    }

    #[test]
    fn ends_where_the_first_value_ends() {
        assert!(!complete(b""));
        assert!(!complete(b"  "));
        assert!(!complete(b"{\"sender_cid\":3,"));
        assert!(complete(b"{\"sender_cid\":3}"));
        assert!(complete(b"{]"));
        assert!(complete(b"\"GetVsockProtocol\""));
        assert!(complete(b"]"));
        assert!(complete(b"3"));
        // Brackets and quotes inside strings do not count.
        assert!(!complete(br#"{"message":"}]\""#));
        assert!(complete(br#"{"message":"}]\"x"}"#));
        assert!(complete(br#"{"a":[1,{"b":"\\"}],"c":null}"#));
    }

    #[test]
    fn a_request_fed_byte_by_byte_is_scanned_once() {
        // 60 KiB of nested JSON, one byte per read: each byte is looked at
        // exactly once (re-parsing from the start after every read would
        // look at about n^2/2 = 1.8e9 bytes).
        let mut req = String::from(r#"{"sender_cid":3,"message":{"Notify":{"count":1,"message":""#);
        req.push_str(&"x\\\"[{".repeat(12_000));
        req.push_str(r#""}}}"#);
        let mut f = JsonFrame::default();
        let bytes = req.as_bytes();
        for (i, b) in bytes.iter().enumerate() {
            let done = f.feed(std::slice::from_ref(b));
            assert_eq!(done, i == bytes.len() - 1, "at byte {i}");
        }
        assert_eq!(f.scanned(), bytes.len());
    }
}
