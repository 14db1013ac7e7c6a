//! The control API: JSON-RPC 2.0 on a Unix socket (mode 0600), one request object per line
//! and one response per line. The schema is an OpenRPC document ([`SCHEMA`], also returned by
//! the method `rpc.discover`); its `info.version` is the API version.
//!
//! Errors are JSON-RPC errors whose `data.kind` is the error kind (`not-found`, `in-use`,
//! `invalid-input`, `read-only`, `unsupported`, `io`, ...): clients decide on the kind, people
//! read the message.
//!
//! ```text
//! -> {"jsonrpc":"2.0","id":1,"method":"export.add","params":{"name":"d0","target":"disk.vhdx"}}
//! <- {"jsonrpc":"2.0","id":1,"result":{"name":"d0","size":1073741824,...}}
//! -> {"jsonrpc":"2.0","id":2,"method":"export.remove","params":{"name":"nope"}}
//! <- {"jsonrpc":"2.0","id":2,"error":{"code":-32000,"message":"no export named 'nope'","data":{"kind":"not-found"}}}
//! ```

use crate::export::{kind_name, ServeError};
use crate::registry::Registry;
use serde_json::{json, Value};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use vstor_core::ErrorKind;

/// The OpenRPC schema of the API.
pub const SCHEMA: &str = include_str!("../schema/vstor-serve.openrpc.json");
/// The API version (the schema's `info.version`).
pub const API_VERSION: &str = "1.0.0";
/// The longest request line accepted; a longer one is answered with an error and the
/// connection is closed.
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

/// What the API can do to the daemon beyond its registry.
pub trait Host: Send + Sync {
    /// Begins a graceful shutdown.
    fn shutdown(&self);
    /// Facts about the server (version, listeners, uptime).
    fn server_info(&self) -> Value;
}

/// The control API over a registry.
pub struct Control {
    registry: Arc<Registry>,
    host: Arc<dyn Host>,
}

/// A failed call: JSON-RPC code, message, kind.
struct Failure(i64, String, ErrorKind);

impl From<ServeError> for Failure {
    fn from(e: ServeError) -> Self {
        Failure(code::FAILED, e.message, e.kind)
    }
}

fn bad_params(msg: impl Into<String>) -> Failure {
    Failure(code::INVALID_PARAMS, msg.into(), ErrorKind::InvalidInput)
}

fn str_param<'a>(p: &'a Value, key: &str) -> Result<&'a str, Failure> {
    p.get(key)
        .and_then(Value::as_str)
        .ok_or_else(|| bad_params(format!("parameter '{key}' (a string) is required")))
}

fn opt_str<'a>(p: &'a Value, key: &str) -> Result<Option<&'a str>, Failure> {
    match p.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_str()
            .map(Some)
            .ok_or_else(|| bad_params(format!("parameter '{key}' must be a string"))),
    }
}

fn opt_u64(p: &Value, key: &str) -> Result<Option<u64>, Failure> {
    match p.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_u64()
            .map(Some)
            .ok_or_else(|| bad_params(format!("parameter '{key}' must be a whole number"))),
    }
}

fn opt_bool(p: &Value, key: &str) -> Result<Option<bool>, Failure> {
    match p.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_bool()
            .map(Some)
            .ok_or_else(|| bad_params(format!("parameter '{key}' must be true or false"))),
    }
}

fn to_value<T: serde::Serialize>(v: T) -> Value {
    serde_json::to_value(v).unwrap_or(Value::Null)
}

impl Control {
    /// The API of `registry`, with `host` for shutdown and server facts.
    pub fn new(registry: Arc<Registry>, host: Arc<dyn Host>) -> Arc<Self> {
        Arc::new(Control { registry, host })
    }

    /// Serves the API on a new Unix socket at `path` (mode 0600) until `stop` is set.
    pub fn listen(
        self: &Arc<Self>,
        path: &Path,
        stop: Arc<AtomicBool>,
    ) -> io::Result<JoinHandle<()>> {
        if path.exists() {
            // A socket left by a daemon that died: reuse the name only if nobody answers.
            if UnixStream::connect(path).is_ok() {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!("{} is in use by a running daemon", path.display()),
                ));
            }
            std::fs::remove_file(path)?;
        }
        let l = UnixListener::bind(path)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
        let me = self.clone();
        std::thread::Builder::new()
            .name("control-accept".into())
            .spawn(move || {
                for s in l.incoming() {
                    if stop.load(Ordering::Acquire) {
                        return;
                    }
                    let Ok(s) = s else { continue };
                    let me = me.clone();
                    let _ = std::thread::Builder::new()
                        .name("control".into())
                        .spawn(move || me.serve_client(s));
                }
            })
    }

    fn serve_client(&self, s: UnixStream) {
        let Ok(w) = s.try_clone() else { return };
        let mut w = io::BufWriter::new(w);
        let mut r = BufReader::new(s.take(u64::MAX));
        loop {
            let mut line = Vec::new();
            let n = match (&mut r)
                .take(MAX_REQUEST_LINE as u64 + 1)
                .read_until(b'\n', &mut line)
            {
                Ok(n) => n,
                Err(_) => return,
            };
            if n == 0 {
                return;
            }
            if line.len() > MAX_REQUEST_LINE {
                let e = error_response(
                    Value::Null,
                    &Failure(
                        code::INVALID_REQUEST,
                        format!("request line longer than {MAX_REQUEST_LINE} bytes"),
                        ErrorKind::InvalidInput,
                    ),
                );
                let _ = writeln!(w, "{e}").and_then(|_| w.flush());
                return;
            }
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            let resp = self.handle_line(&line);
            if let Some(resp) = resp {
                if writeln!(w, "{resp}").and_then(|_| w.flush()).is_err() {
                    return;
                }
            }
        }
    }

    /// Answers one request line (None for a notification, which gets no answer).
    pub fn handle_line(&self, line: &[u8]) -> Option<Value> {
        let req: Value = match serde_json::from_slice(line) {
            Ok(v) => v,
            Err(e) => {
                return Some(error_response(
                    Value::Null,
                    &Failure(
                        code::PARSE_ERROR,
                        format!("not JSON: {e}"),
                        ErrorKind::InvalidInput,
                    ),
                ))
            }
        };
        let id = req.get("id").cloned();
        let method = req.get("method").and_then(Value::as_str);
        let (Some(method), Some("2.0")) = (method, req.get("jsonrpc").and_then(Value::as_str))
        else {
            return Some(error_response(
                id.unwrap_or(Value::Null),
                &Failure(
                    code::INVALID_REQUEST,
                    "not a JSON-RPC 2.0 request (jsonrpc \"2.0\" and a method are required)".into(),
                    ErrorKind::InvalidInput,
                ),
            ));
        };
        let params = req.get("params").cloned().unwrap_or(json!({}));
        let result = if params.is_object() {
            self.call(method, &params)
        } else {
            Err(bad_params("params must be an object"))
        };
        let id = id?;
        Some(match result {
            Ok(v) => json!({"jsonrpc": "2.0", "id": id, "result": v}),
            Err(f) => error_response(id, &f),
        })
    }

    fn call(&self, method: &str, p: &Value) -> Result<Value, Failure> {
        let reg = &self.registry;
        match method {
            "rpc.discover" => serde_json::from_str(SCHEMA)
                .map_err(|e| Failure(code::FAILED, e.to_string(), ErrorKind::Io)),
            "server.info" => Ok(self.host.server_info()),
            "server.shutdown" => {
                self.host.shutdown();
                Ok(json!({}))
            }
            "export.list" => Ok(to_value(reg.list())),
            "export.add" => {
                let name = str_param(p, "name")?;
                let target = str_param(p, "target")?;
                let ro = opt_bool(p, "readonly")?.unwrap_or(false);
                let e = reg.add(name, target, ro)?;
                Ok(to_value(e.info()))
            }
            "export.remove" => {
                let name = str_param(p, "name")?;
                reg.remove_and_wait(name, std::time::Duration::from_secs(30))?;
                Ok(json!({}))
            }
            "export.stats" => match opt_str(p, "name")? {
                Some(name) => Ok(to_value(reg.get(name)?.stats())),
                None => Ok(to_value(
                    reg.exports().iter().map(|e| e.stats()).collect::<Vec<_>>(),
                )),
            },
            "export.set-qos" => {
                let e = reg.get(str_param(p, "name")?)?;
                let (max, min) = (opt_u64(p, "max_iops")?, opt_u64(p, "min_iops")?);
                if max.is_none() && min.is_none() {
                    return Err(bad_params("give max_iops, min_iops or both"));
                }
                e.set_qos(max, min)?;
                Ok(to_value(e.stats()))
            }
            "export.resize" => {
                let e = reg.get(str_param(p, "name")?)?;
                let size = opt_u64(p, "size")?
                    .ok_or_else(|| bad_params("parameter 'size' is required"))?;
                let size = e.resize(size)?;
                Ok(json!({"size": size}))
            }
            "export.checkpoint" => {
                let e = reg.get(str_param(p, "name")?)?;
                let child = opt_str(p, "child")?.map(Path::new);
                Ok(json!({"child": e.checkpoint(child)?}))
            }
            "export.merge" => {
                let e = reg.get(str_param(p, "name")?)?;
                Ok(json!({"into": e.merge()?}))
            }
            "export.clone" => {
                let e = reg.get(str_param(p, "name")?)?;
                let dest = str_param(p, "dest")?;
                Ok(json!({"dest": dest, "bytes": e.clone_to(Path::new(dest))?}))
            }
            _ => Err(Failure(
                code::METHOD_NOT_FOUND,
                format!("no method named '{method}' (rpc.discover lists them)"),
                ErrorKind::NotFound,
            )),
        }
    }
}

fn error_response(id: Value, f: &Failure) -> Value {
    json!({
        "jsonrpc": "2.0",
        "id": id,
        "error": {"code": f.0, "message": f.1, "data": {"kind": kind_name(f.2)}},
    })
}

/// A client of the API (what `vstor export ...` uses).
pub struct Client {
    r: BufReader<UnixStream>,
    w: UnixStream,
    next: u64,
}

/// A failed call as the client sees it.
#[derive(Debug, Clone)]
pub struct CallError {
    /// The kind from `data.kind` (`io` when the answer had none).
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
    /// Connects to the API socket at `path`.
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
            message: format!("the daemon's API socket: {e}"),
        };
        writeln!(self.w, "{req}").map_err(io_err)?;
        let mut line = String::new();
        if self.r.read_line(&mut line).map_err(io_err)? == 0 {
            return Err(CallError {
                kind: "io".into(),
                message: "the daemon closed the API connection".into(),
            });
        }
        let v: Value = serde_json::from_str(&line).map_err(|e| CallError {
            kind: "io".into(),
            message: format!("the daemon answered something that is not JSON: {e}"),
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
