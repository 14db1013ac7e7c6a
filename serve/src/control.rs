//! The control API: JSON-RPC 2.0 on a Unix socket (mode 0600), one request object per line
//! and one response per line ([`crate::jsonrpc`], the style the reference VMM's API shares).
//! The schema is an OpenRPC document ([`SCHEMA`], also returned by the method `rpc.discover`);
//! its `info.version` is the API version.
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

use crate::export::{Export, ServeError};
use crate::iscsi::{IscsiServer, TargetOpts};
use crate::jsonrpc::{self, opt_bool, opt_str, opt_u64, str_param, u64_param, Failure};
use crate::registry::Registry;
use serde_json::{json, Value};
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use vstor_core::ErrorKind;

pub use crate::jsonrpc::{code, CallError, Client, MAX_REQUEST_LINE};

/// The OpenRPC schema of the API.
pub const SCHEMA: &str = include_str!("../schema/vstor-serve.openrpc.json");
/// The API version (the schema's `info.version`).
pub const API_VERSION: &str = "1.0.0";

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
    /// The daemon's iSCSI server, which takes the iSCSI options of exports added here.
    iscsi: Option<Arc<IscsiServer>>,
    /// Held while an export is added (its iSCSI options are set before it is served).
    adding: Mutex<()>,
}

fn to_value<T: serde::Serialize>(v: T) -> Value {
    serde_json::to_value(v).unwrap_or(Value::Null)
}

impl Control {
    /// The API of `registry`, with `host` for shutdown and server facts.
    pub fn new(registry: Arc<Registry>, host: Arc<dyn Host>) -> Arc<Self> {
        Self::with_iscsi(registry, host, None)
    }

    /// The API of `registry`, whose exports `iscsi` also serves: `export.add` gives it the
    /// export's iSCSI options.
    pub fn with_iscsi(
        registry: Arc<Registry>,
        host: Arc<dyn Host>,
        iscsi: Option<Arc<IscsiServer>>,
    ) -> Arc<Self> {
        Arc::new(Control {
            registry,
            host,
            iscsi,
            adding: Mutex::new(()),
        })
    }

    /// `export.add`: the target string may carry the iSCSI options of `--export`
    /// (`shared=on`, `iqn=NAME`, `initiators=NAME+NAME`, parsed by the same
    /// [`TargetOpts::split_from`]); the rest opens the stack. The options take effect before
    /// the export is served, so no login sees it without its ACL; a name in use keeps its
    /// export and options. Without an iSCSI portal the options are taken and have no effect,
    /// as on the command line.
    fn add_export(&self, name: &str, target: &str, ro: bool) -> Result<Arc<Export>, ServeError> {
        let (opts, target) = TargetOpts::split_from(target)
            .map_err(|e| ServeError::invalid(format!("export.add {name}: {e}")))?;
        let _g = self.adding.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(iscsi) = &self.iscsi {
            if self.registry.get(name).is_err() {
                iscsi.set_target_opts(name, opts);
            }
        }
        self.registry.add(name, &target, ro)
    }

    /// Serves the API on a new Unix socket at `path` (mode 0600) until `stop` is set.
    pub fn listen(
        self: &Arc<Self>,
        path: &Path,
        stop: Arc<AtomicBool>,
    ) -> io::Result<JoinHandle<()>> {
        let l = crate::sockpath::bind_unix(path)?;
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
                        .spawn(move || {
                            jsonrpc::serve_connection(s, MAX_REQUEST_LINE, |l| me.handle_line(l))
                        });
                }
            })
    }

    /// Answers one request line (None for a notification, which gets no answer).
    pub fn handle_line(&self, line: &[u8]) -> Option<Value> {
        jsonrpc::answer(line, |method, p| self.call(method, p))
    }

    fn call(&self, method: &str, p: &Value) -> Result<Value, Failure> {
        let reg = &self.registry;
        match method {
            "rpc.discover" => serde_json::from_str(SCHEMA)
                .map_err(|e| Failure::failed(ErrorKind::Io, e.to_string())),
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
                let e = self.add_export(name, target, ro)?;
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
                    return Err(Failure::bad_params("give max_iops, min_iops or both"));
                }
                e.set_qos(max, min)?;
                Ok(to_value(e.stats()))
            }
            "export.resize" => {
                let e = reg.get(str_param(p, "name")?)?;
                let size = u64_param(p, "size")?;
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
            "export.move" => {
                let e = reg.get(str_param(p, "name")?)?;
                let dest = str_param(p, "dest")?;
                let keep = opt_bool(p, "keep_source")?.unwrap_or(false);
                let r = e.move_to(Path::new(dest), keep)?;
                Ok(json!({
                    "from": r.from.display().to_string(),
                    "dest": r.to.display().to_string(),
                    "bytes": r.copied_bytes,
                    "paused_ms": r.paused.as_secs_f64() * 1000.0,
                    "deleted": r.deleted.map(|p| p.display().to_string()),
                }))
            }
            _ => Err(Failure::no_method(method)),
        }
    }
}
