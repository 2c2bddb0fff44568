//! Just enough HTTP/1.x for the API: framing requests out of a byte buffer (httparse does the
//! request line and headers) and writing the responses Firecracker writes.
//!
//! Framing is by `Content-Length` only. Anything that would leave the stream out of step
//! (a bad request line, oversized headers, a body over the limit, chunked encoding) is an
//! [`HttpError`], after which the connection is answered once and closed.

use std::fmt::Write as _;

/// The most header lines a request may carry.
pub const MAX_HEADERS: usize = 32;
/// The most bytes the request line and headers may take, blank line included.
pub const MAX_HEAD_BYTES: usize = 8192;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Version {
    Http10,
    Http11,
}

impl Version {
    pub fn as_str(self) -> &'static str {
        match self {
            Version::Http10 => "HTTP/1.0",
            Version::Http11 => "HTTP/1.1",
        }
    }
}

/// One complete request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    pub method: String,
    pub path: String,
    pub version: Version,
    /// `None` when there is no `Content-Length` or it is 0, as in Firecracker.
    pub body: Option<Vec<u8>>,
    /// Whether the client wants the connection kept after the answer.
    pub keep_alive: bool,
}

/// A request that cannot be framed: answer it with `status` and close the connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpError {
    pub status: u16,
    pub message: String,
}

impl HttpError {
    fn bad(message: impl Into<String>) -> HttpError {
        HttpError {
            status: 400,
            message: message.into(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Parse {
    /// More bytes are needed. `expect_continue` is set once the headers are complete and the
    /// client waits for `100 Continue` before sending the body.
    Incomplete {
        expect_continue: bool,
    },
    /// A request, and how many bytes of the buffer it took.
    Complete {
        request: Request,
        consumed: usize,
    },
    Invalid(HttpError),
}

fn httparse_reason(e: httparse::Error) -> &'static str {
    match e {
        httparse::Error::HeaderName => "invalid header name",
        httparse::Error::HeaderValue => "invalid header value",
        httparse::Error::NewLine => "invalid line ending",
        httparse::Error::Status => "invalid status",
        httparse::Error::Token => "invalid token in the request line",
        httparse::Error::TooManyHeaders => "too many headers",
        httparse::Error::Version => "unsupported HTTP version",
    }
}

/// Frames the first request in `buf`, refusing bodies over `max_payload` bytes.
pub fn parse(buf: &[u8], max_payload: usize) -> Parse {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let head_len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => {
            if buf.len() > MAX_HEAD_BYTES {
                return Parse::Invalid(HttpError::bad(format!(
                    "The request headers are larger than the limit of {MAX_HEAD_BYTES} bytes."
                )));
            }
            return Parse::Incomplete {
                expect_continue: false,
            };
        }
        Err(httparse::Error::TooManyHeaders) => {
            return Parse::Invalid(HttpError::bad(format!(
                "The request has too many headers; at most {MAX_HEADERS} are allowed."
            )))
        }
        Err(e) => {
            return Parse::Invalid(HttpError::bad(format!(
                "Invalid HTTP request: {}.",
                httparse_reason(e)
            )))
        }
    };
    if head_len > MAX_HEAD_BYTES {
        return Parse::Invalid(HttpError::bad(format!(
            "The request headers are larger than the limit of {MAX_HEAD_BYTES} bytes."
        )));
    }
    // httparse only completes with all three parts of the request line present.
    let (Some(method), Some(path), Some(minor)) = (req.method, req.path, req.version) else {
        return Parse::Invalid(HttpError::bad("Invalid HTTP request line."));
    };
    let version = if minor == 0 {
        Version::Http10
    } else {
        Version::Http11
    };

    let mut content_length: Option<usize> = None;
    let mut keep_alive = version == Version::Http11;
    let mut expect_continue = false;
    for h in req.headers.iter() {
        let Ok(value) = std::str::from_utf8(h.value) else {
            return Parse::Invalid(HttpError::bad(format!(
                "Invalid value for header {}.",
                h.name
            )));
        };
        let value = value.trim();
        if h.name.eq_ignore_ascii_case("content-length") {
            if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
                return Parse::Invalid(HttpError::bad("Invalid Content-Length header."));
            }
            // Digits only, so a parse failure means overflow: bigger than any limit.
            let n = value.parse::<usize>().unwrap_or(usize::MAX);
            if content_length.is_some_and(|c| c != n) {
                return Parse::Invalid(HttpError::bad("Conflicting Content-Length headers."));
            }
            content_length = Some(n);
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            return Parse::Invalid(HttpError::bad(
                "Transfer-Encoding is not supported; send the body with a Content-Length header.",
            ));
        } else if h.name.eq_ignore_ascii_case("connection") {
            for token in value.split(',').map(str::trim) {
                if token.eq_ignore_ascii_case("close") {
                    keep_alive = false;
                } else if token.eq_ignore_ascii_case("keep-alive") {
                    keep_alive = true;
                }
            }
        } else if h.name.eq_ignore_ascii_case("expect") {
            // An HTTP/1.0 client cannot understand a 1xx answer (RFC 9110, 10.1.1).
            if version == Version::Http10 {
                continue;
            }
            if value.eq_ignore_ascii_case("100-continue") {
                expect_continue = true;
            } else {
                return Parse::Invalid(HttpError {
                    status: 417,
                    message: format!("Unsupported expectation {value:?}."),
                });
            }
        }
    }
    let len = content_length.unwrap_or(0);
    if len > max_payload {
        return Parse::Invalid(HttpError::bad(format!(
            "Request payload with size {len} is larger than the limit of {max_payload} allowed \
             by server. All previous unanswered requests will be dropped."
        )));
    }
    // Only a max_payload near usize::MAX could overflow here.
    let Some(end) = head_len.checked_add(len) else {
        return Parse::Invalid(HttpError::bad("Invalid Content-Length header."));
    };
    if buf.len() < end {
        return Parse::Incomplete { expect_continue };
    }
    Parse::Complete {
        request: Request {
            method: method.to_string(),
            path: path.to_string(),
            version,
            body: (len > 0).then(|| buf[head_len..end].to_vec()),
            keep_alive,
        },
        consumed: end,
    }
}

pub fn reason_phrase(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        204 => "No Content",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        413 => "Payload Too Large",
        417 => "Expectation Failed",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        _ => "Unknown",
    }
}

/// `{"fault_message": "..."}`, the body of every error.
pub fn fault_body(message: &str) -> String {
    serde_json::json!({ "fault_message": message }).to_string()
}

/// Appends a response. A `body` is sent as JSON; without one, no entity headers are sent
/// (204), as Firecracker does.
pub fn write_response(
    out: &mut Vec<u8>,
    version: Version,
    status: u16,
    body: Option<&str>,
    keep_alive: bool,
) {
    let mut head = String::with_capacity(160);
    // Writing to a String cannot fail.
    let _ = write!(
        head,
        "{} {} {}\r\nServer: Firecracker API\r\nConnection: {}\r\n",
        version.as_str(),
        status,
        reason_phrase(status),
        if keep_alive { "keep-alive" } else { "close" }
    );
    if let Some(body) = body {
        let _ = write!(
            head,
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        );
    }
    head.push_str("\r\n");
    out.extend_from_slice(head.as_bytes());
    if let Some(body) = body {
        out.extend_from_slice(body.as_bytes());
    }
}

/// The interim answer to `Expect: 100-continue`.
pub fn write_continue(out: &mut Vec<u8>, version: Version) {
    out.extend_from_slice(version.as_str().as_bytes());
    out.extend_from_slice(b" 100 Continue\r\n\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMIT: usize = 51200;

    fn complete(buf: &[u8]) -> (Request, usize) {
        match parse(buf, LIMIT) {
            Parse::Complete { request, consumed } => (request, consumed),
            other => panic!("expected a complete request, got {other:?}"),
        }
    }

    fn invalid(buf: &[u8], limit: usize) -> HttpError {
        match parse(buf, limit) {
            Parse::Invalid(e) => e,
            other => panic!("expected an error, got {other:?}"),
        }
    }

    #[test]
    fn complete_request_with_body() {
        let raw = b"PUT /machine-config HTTP/1.1\r\nHost: localhost\r\nContent-Type: \
                    application/json\r\nContent-Length: 2\r\n\r\n{}";
        let (r, n) = complete(raw);
        assert_eq!(n, raw.len());
        assert_eq!(r.method, "PUT");
        assert_eq!(r.path, "/machine-config");
        assert_eq!(r.version, Version::Http11);
        assert_eq!(r.body.as_deref(), Some(&b"{}"[..]));
        assert!(r.keep_alive);
    }

    #[test]
    fn zero_length_body_is_no_body() {
        let (r, _) = complete(b"PUT /actions HTTP/1.1\r\nContent-Length: 0\r\n\r\n");
        assert_eq!(r.body, None);
    }

    #[test]
    fn partial_requests_wait_for_more() {
        let raw = b"PUT /logger HTTP/1.1\r\nContent-Length: 11\r\n\r\n{\"level\":1}";
        for cut in 0..raw.len() {
            assert!(
                matches!(parse(&raw[..cut], LIMIT), Parse::Incomplete { .. }),
                "cut at {cut}"
            );
        }
        let (r, n) = complete(raw);
        assert_eq!(n, raw.len());
        assert_eq!(r.body.as_deref(), Some(&b"{\"level\":1}"[..]));
    }

    #[test]
    fn pipelined_requests_split_in_order() {
        let raw = b"GET / HTTP/1.1\r\n\r\nPUT /a HTTP/1.1\r\nContent-Length: 3\r\n\r\nabcGET /v";
        let (r1, n1) = complete(raw);
        assert_eq!((r1.method.as_str(), r1.path.as_str()), ("GET", "/"));
        let (r2, n2) = complete(&raw[n1..]);
        assert_eq!(r2.path, "/a");
        assert_eq!(r2.body.as_deref(), Some(&b"abc"[..]));
        assert!(matches!(
            parse(&raw[n1 + n2..], LIMIT),
            Parse::Incomplete { .. }
        ));
    }

    #[test]
    fn oversized_headers_are_refused() {
        let mut raw = b"GET / HTTP/1.1\r\nX-Big: ".to_vec();
        raw.extend(std::iter::repeat_n(b'a', MAX_HEAD_BYTES));
        // Still no end of headers: refused as soon as it cannot fit.
        let e = invalid(&raw, LIMIT);
        assert_eq!(e.status, 400);
        assert!(e.message.contains("8192"), "{}", e.message);
        raw.extend_from_slice(b"\r\n\r\n");
        invalid(&raw, LIMIT);
    }

    #[test]
    fn too_many_headers_are_refused() {
        let mut raw = b"GET / HTTP/1.1\r\n".to_vec();
        for i in 0..MAX_HEADERS {
            raw.extend_from_slice(format!("X-H{i}: v\r\n").as_bytes());
        }
        raw.extend_from_slice(b"\r\n");
        complete(&raw);
        let mut more = raw[..raw.len() - 2].to_vec();
        more.extend_from_slice(b"X-One-Too-Many: v\r\n\r\n");
        let e = invalid(&more, LIMIT);
        assert!(e.message.contains("too many headers"), "{}", e.message);
    }

    #[test]
    fn body_over_the_limit_is_refused_before_it_arrives() {
        let e = invalid(b"PUT /mmds HTTP/1.1\r\nContent-Length: 101\r\n\r\n", 100);
        assert_eq!(
            e.message,
            "Request payload with size 101 is larger than the limit of 100 allowed by server. \
             All previous unanswered requests will be dropped."
        );
        let e = invalid(
            b"PUT /mmds HTTP/1.1\r\nContent-Length: 99999999999999999999999999\r\n\r\n",
            100,
        );
        assert_eq!(e.status, 400);
        // At the limit is fine.
        assert!(matches!(
            parse(b"PUT /mmds HTTP/1.1\r\nContent-Length: 100\r\n\r\n", 100),
            Parse::Incomplete { .. }
        ));
    }

    #[test]
    fn body_without_content_length_is_the_next_request() {
        let raw = b"PUT /boot-source HTTP/1.1\r\n\r\n{\"kernel_image_path\":\"x\"}";
        let (r, n) = complete(raw);
        assert_eq!(r.body, None);
        // What follows cannot be a request line.
        invalid(&raw[n..], LIMIT);
    }

    #[test]
    fn chunked_and_bad_lengths_are_refused() {
        let e = invalid(
            b"PUT /mmds HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
            LIMIT,
        );
        assert!(e.message.contains("Transfer-Encoding"));
        invalid(b"PUT / HTTP/1.1\r\nContent-Length: -1\r\n\r\n", LIMIT);
        invalid(b"PUT / HTTP/1.1\r\nContent-Length: 1x\r\n\r\n", LIMIT);
        invalid(
            b"PUT / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            LIMIT,
        );
        // The same length twice is harmless.
        assert!(matches!(
            parse(
                b"PUT / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\nx",
                LIMIT
            ),
            Parse::Complete { .. }
        ));
    }

    #[test]
    fn bad_request_lines_are_refused_early() {
        invalid(b"GET / HTTP/2.0\r\n\r\n", LIMIT);
        invalid(b"G(T / HTTP/1.1\r\n", LIMIT);
        invalid(b"\x00\x01\x02", LIMIT);
        invalid(b"GET /\r\n\r\n", LIMIT);
    }

    #[test]
    fn connection_and_version_rules() {
        let (r, _) = complete(b"GET / HTTP/1.0\r\n\r\n");
        assert_eq!(r.version, Version::Http10);
        assert!(!r.keep_alive);
        let (r, _) = complete(b"GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n");
        assert!(r.keep_alive);
        let (r, _) = complete(b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n");
        assert!(!r.keep_alive);
    }

    #[test]
    fn expect_continue() {
        let head = b"PUT /logger HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n";
        assert_eq!(
            parse(head, LIMIT),
            Parse::Incomplete {
                expect_continue: true
            }
        );
        let mut full = head.to_vec();
        full.extend_from_slice(b"{}");
        assert!(matches!(parse(&full, LIMIT), Parse::Complete { .. }));
        let e = invalid(b"PUT / HTTP/1.1\r\nExpect: magic\r\n\r\n", LIMIT);
        assert_eq!(e.status, 417);
    }

    #[test]
    fn expect_is_ignored_for_http10() {
        let head = b"PUT /logger HTTP/1.0\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n";
        assert_eq!(
            parse(head, LIMIT),
            Parse::Incomplete {
                expect_continue: false
            }
        );
        let (r, _) = complete(b"GET / HTTP/1.0\r\nExpect: magic\r\n\r\n");
        assert_eq!(r.version, Version::Http10);
    }

    #[test]
    fn response_formatting() {
        let mut out = Vec::new();
        write_response(&mut out, Version::Http11, 204, None, true);
        assert_eq!(
            out,
            b"HTTP/1.1 204 No Content\r\nServer: Firecracker API\r\nConnection: keep-alive\r\n\r\n"
        );
        out.clear();
        write_response(&mut out, Version::Http11, 200, Some("{\"a\":1}"), true);
        assert_eq!(
            String::from_utf8_lossy(&out),
            "HTTP/1.1 200 OK\r\nServer: Firecracker API\r\nConnection: keep-alive\r\n\
             Content-Type: application/json\r\nContent-Length: 7\r\n\r\n{\"a\":1}"
        );
        out.clear();
        let body = fault_body("bad \"thing\"");
        assert_eq!(body, r#"{"fault_message":"bad \"thing\""}"#);
        write_response(&mut out, Version::Http10, 400, Some(&body), false);
        let s = String::from_utf8_lossy(&out);
        assert!(s.starts_with("HTTP/1.0 400 Bad Request\r\n"), "{s}");
        assert!(s.contains("Connection: close\r\n"), "{s}");
        out.clear();
        write_continue(&mut out, Version::Http11);
        assert_eq!(out, b"HTTP/1.1 100 Continue\r\n\r\n");
    }
}
