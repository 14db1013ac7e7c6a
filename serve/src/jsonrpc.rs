//! JSON-RPC 2.0 over a Unix socket, one object per line each way: the one API style of vstor's
//! long-running programs (the daemon's control API and the reference VMM's API socket).
//!
//! A request is `{"jsonrpc":"2.0","id":ID,"method":"...","params":{...}}`; the answer carries
//! the same id and either `result` or `error` `{code, message, data: {kind}}`, where `kind` is
//! the error kind (`not-found`, `in-use`, `invalid-input`, `read-only`, `unsupported`, `io`, ...)
//! that clients decide on. A request without an id is a notification and gets no answer. Each
//! program publishes its methods as an OpenRPC document returned by `rpc.discover`.

use crate::export::kind_name;
use serde_json::{json, Value};
use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use vstor_core::ErrorKind;

/// The longest request line read; a longer one is answered with an error and the connection is
/// closed, so a client cannot make the server hold more than this for it.
pub const MAX_REQUEST_LINE: usize = 1 << 20;

/// JSON-RPC error codes.
pub mod code {
    /// The line is not JSON.
    pub const PARSE_ERROR: i64 = -32700;
    /// Not a JSON-RPC 2.0 request.
    pub const INVALID_REQUEST: i64 = -32600;
    /// No such method.
    pub const METHOD_NOT_FOUND: i64 = -32601;
    /// Parameters missing or of the wrong type.
    pub const INVALID_PARAMS: i64 = -32602;
    /// The operation failed; `data.kind` says how.
    pub const FAILED: i64 = -32000;
}

/// A failed call: its JSON-RPC code, message and kind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// The JSON-RPC error code.
    pub code: i64,
    /// The message, for people.
    pub message: String,
    /// The kind, for programs.
    pub kind: ErrorKind,
}

impl Failure {
    /// The operation failed with `kind`.
    pub fn failed(kind: ErrorKind, message: impl Into<String>) -> Self {
        Failure {
            code: code::FAILED,
            message: message.into(),
            kind,
        }
    }

    /// Parameters missing or of the wrong type.
    pub fn bad_params(message: impl Into<String>) -> Self {
        Failure {
            code: code::INVALID_PARAMS,
            message: message.into(),
            kind: ErrorKind::InvalidInput,
        }
    }

    /// No method of that name.
    pub fn no_method(method: &str) -> Self {
        Failure {
            code: code::METHOD_NOT_FOUND,
            message: format!("no method named '{method}' (rpc.discover lists them)"),
            kind: ErrorKind::NotFound,
        }
    }
}

impl From<crate::export::ServeError> for Failure {
    fn from(e: crate::export::ServeError) -> Self {
        Failure::failed(e.kind, e.message)
    }
}

/// The error answer to request `id`.
pub fn error_response(id: Value, f: &Failure) -> Value {
    json!({
        "jsonrpc": "2.0",
        "id": id,
        "error": {"code": f.code, "message": f.message, "data": {"kind": kind_name(f.kind)}},
    })
}

/// A string parameter that must be there.
pub fn str_param<'a>(p: &'a Value, key: &str) -> Result<&'a str, Failure> {
    p.get(key)
        .and_then(Value::as_str)
        .ok_or_else(|| Failure::bad_params(format!("parameter '{key}' (a string) is required")))
}

/// A string parameter that may be left out (or null).
pub fn opt_str<'a>(p: &'a Value, key: &str) -> Result<Option<&'a str>, Failure> {
    match p.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_str()
            .map(Some)
            .ok_or_else(|| Failure::bad_params(format!("parameter '{key}' must be a string"))),
    }
}

/// A whole-number parameter that may be left out (or null).
pub fn opt_u64(p: &Value, key: &str) -> Result<Option<u64>, Failure> {
    match p.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v.as_u64().map(Some).ok_or_else(|| {
            Failure::bad_params(format!("parameter '{key}' must be a whole number"))
        }),
    }
}

/// A whole-number parameter that must be there.
pub fn u64_param(p: &Value, key: &str) -> Result<u64, Failure> {
    opt_u64(p, key)?.ok_or_else(|| {
        Failure::bad_params(format!("parameter '{key}' (a whole number) is required"))
    })
}

/// A boolean parameter that may be left out (or null).
pub fn opt_bool(p: &Value, key: &str) -> Result<Option<bool>, Failure> {
    match p.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_bool()
            .map(Some)
            .ok_or_else(|| Failure::bad_params(format!("parameter '{key}' must be true or false"))),
    }
}

/// Answers one request line with `call(method, params)` (None for a notification).
pub fn answer(
    line: &[u8],
    call: impl FnOnce(&str, &Value) -> Result<Value, Failure>,
) -> Option<Value> {
    let req: Value = match serde_json::from_slice(line) {
        Ok(v) => v,
        Err(e) => {
            return Some(error_response(
                Value::Null,
                &Failure {
                    code: code::PARSE_ERROR,
                    message: format!("not JSON: {e}"),
                    kind: ErrorKind::InvalidInput,
                },
            ))
        }
    };
    let id = req.get("id").cloned();
    let method = req.get("method").and_then(Value::as_str);
    let (Some(method), Some("2.0")) = (method, req.get("jsonrpc").and_then(Value::as_str)) else {
        return Some(error_response(
            id.unwrap_or(Value::Null),
            &Failure {
                code: code::INVALID_REQUEST,
                message: "not a JSON-RPC 2.0 request (\"jsonrpc\": \"2.0\" and a \"method\" \
                          are required)"
                    .into(),
                kind: ErrorKind::InvalidInput,
            },
        ));
    };
    let params = req.get("params").cloned().unwrap_or(json!({}));
    let result = if params.is_object() {
        call(method, &params)
    } else {
        Err(Failure::bad_params("params must be an object"))
    };
    let id = id?;
    Some(match result {
        Ok(v) => json!({"jsonrpc": "2.0", "id": id, "result": v}),
        Err(f) => error_response(id, &f),
    })
}

/// What the next request on a connection is.
enum Next {
    /// A line (without its newline).
    Line(Vec<u8>),
    /// More than the limit without a newline (what was read of it is dropped).
    TooLong,
    /// The client closed the connection.
    End,
}

/// Reads one request line of at most `max` bytes, never holding more than that.
fn next_request(r: &mut impl BufRead, max: usize) -> io::Result<Next> {
    let mut line = Vec::new();
    loop {
        let buf = r.fill_buf()?;
        if buf.is_empty() {
            return Ok(if line.is_empty() {
                Next::End
            } else {
                Next::Line(line)
            });
        }
        let (take, done) = match buf.iter().position(|&b| b == b'\n') {
            Some(i) => (i, true),
            None => (buf.len(), false),
        };
        if line.len() + take > max {
            let n = buf.len();
            r.consume(n);
            return Ok(Next::TooLong);
        }
        line.extend_from_slice(&buf[..take]);
        r.consume(take + usize::from(done));
        if done {
            return Ok(Next::Line(line));
        }
    }
}

/// Serves one client connection: each line is answered by `handle` (which gets the line and
/// returns the answer, None for a notification), until the client closes it. A line longer
/// than `max` is answered with an error and the connection is closed.
pub fn serve_connection(stream: UnixStream, max: usize, handle: impl Fn(&[u8]) -> Option<Value>) {
    let Ok(out) = stream.try_clone() else {
        return;
    };
    let mut out = io::BufWriter::new(out);
    let mut input = BufReader::new(stream);
    loop {
        let line = match next_request(&mut input, max) {
            Ok(Next::Line(l)) => l,
            Ok(Next::End) | Err(_) => return,
            Ok(Next::TooLong) => {
                let answer = error_response(
                    Value::Null,
                    &Failure {
                        code: code::INVALID_REQUEST,
                        message: format!(
                            "the request is longer than {max} bytes without a newline; \
                             closing the connection"
                        ),
                        kind: ErrorKind::InvalidInput,
                    },
                );
                let _ = writeln!(out, "{answer}").and_then(|_| out.flush());
                let _ = input.get_ref().shutdown(std::net::Shutdown::Both);
                return;
            }
        };
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        if let Some(answer) = handle(&line) {
            if writeln!(out, "{answer}").and_then(|_| out.flush()).is_err() {
                return;
            }
        }
    }
}

/// A client of a JSON-RPC socket (what `vstor export ...` and tests use).
pub struct Client {
    r: BufReader<UnixStream>,
    w: UnixStream,
    next: u64,
}

/// A failed call as the client sees it.
#[derive(Debug, Clone)]
pub struct CallError {
    /// The kind from `data.kind` (`io` when the answer had none or never came).
    pub kind: String,
    /// The message.
    pub message: String,
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for CallError {}

impl Client {
    /// Connects to the socket at `path`.
    pub fn connect(path: &Path) -> io::Result<Client> {
        let w = UnixStream::connect(path)?;
        Ok(Client {
            r: BufReader::new(w.try_clone()?),
            w,
            next: 1,
        })
    }

    /// Calls `method` with `params`.
    pub fn call(&mut self, method: &str, params: Value) -> Result<Value, CallError> {
        let id = self.next;
        self.next += 1;
        let req = json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params});
        let io_err = |e: io::Error| CallError {
            kind: "io".into(),
            message: format!("the API socket: {e}"),
        };
        writeln!(self.w, "{req}").map_err(io_err)?;
        let mut line = String::new();
        if self.r.read_line(&mut line).map_err(io_err)? == 0 {
            return Err(CallError {
                kind: "io".into(),
                message: "the server closed the API connection".into(),
            });
        }
        let v: Value = serde_json::from_str(&line).map_err(|e| CallError {
            kind: "io".into(),
            message: format!("the server answered something that is not JSON: {e}"),
        })?;
        if let Some(e) = v.get("error") {
            return Err(CallError {
                kind: e
                    .pointer("/data/kind")
                    .and_then(Value::as_str)
                    .unwrap_or("io")
                    .to_string(),
                message: e
                    .get("message")
                    .and_then(Value::as_str)
                    .unwrap_or("unknown error")
                    .to_string(),
            });
        }
        Ok(v.get("result").cloned().unwrap_or(Value::Null))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn echo(line: &[u8]) -> Option<Value> {
        answer(line, |m, p| match m {
            "echo" => Ok(p.clone()),
            "fail" => Err(Failure::failed(ErrorKind::InUse, "busy")),
            other => Err(Failure::no_method(other)),
        })
    }

    #[test]
    fn requests_errors_and_notifications() {
        let ok = echo(br#"{"jsonrpc":"2.0","id":7,"method":"echo","params":{"a":1}}"#).unwrap();
        assert_eq!(ok["id"], 7);
        assert_eq!(ok["result"]["a"], 1);
        let e = echo(br#"{"jsonrpc":"2.0","id":"x","method":"fail"}"#).unwrap();
        assert_eq!(e["error"]["code"], code::FAILED);
        assert_eq!(e["error"]["data"]["kind"], "in-use");
        let e = echo(br#"{"jsonrpc":"2.0","id":1,"method":"nope"}"#).unwrap();
        assert_eq!(e["error"]["code"], code::METHOD_NOT_FOUND);
        assert_eq!(e["error"]["data"]["kind"], "not-found");
        let e = echo(b"{not json").unwrap();
        assert_eq!(e["error"]["code"], code::PARSE_ERROR);
        let e = echo(br#"{"id":1,"method":"echo"}"#).unwrap();
        assert_eq!(e["error"]["code"], code::INVALID_REQUEST);
        let e = echo(br#"{"jsonrpc":"2.0","id":1,"method":"echo","params":[1]}"#).unwrap();
        assert_eq!(e["error"]["code"], code::INVALID_PARAMS);
        // A notification (no id) is not answered.
        assert!(echo(br#"{"jsonrpc":"2.0","method":"echo"}"#).is_none());
    }

    #[test]
    fn a_connection_answers_lines_and_closes_on_an_overlong_one() {
        let (client, server) = UnixStream::pair().unwrap();
        let t = std::thread::spawn(move || serve_connection(server, 64, echo));
        let mut w = client.try_clone().unwrap();
        let mut r = BufReader::new(client);
        writeln!(w, r#"{{"jsonrpc":"2.0","id":1,"method":"echo"}}"#).unwrap();
        let mut line = String::new();
        r.read_line(&mut line).unwrap();
        assert!(line.contains("\"result\""), "{line}");
        w.write_all(&[b'x'; 200]).unwrap();
        line.clear();
        r.read_line(&mut line).unwrap();
        assert!(line.contains("longer than 64 bytes"), "{line}");
        line.clear();
        assert_eq!(r.read_line(&mut line).unwrap(), 0);
        t.join().unwrap();
    }
}
