//! Target strings: one string names a stack, for the CLI, the VMM and the API alike.
//!
//! ```text
//! disk.raw, /dev/sdb, raw:PATH      a plain file or block device
//! disk.vhdx, vhdx:PATH              a VHDX file with its parent chain
//! pool:DIR/NAME                     a space of the pool whose member disks are in DIR
//! ```
//!
//! Options follow after commas as `key=value`, in the style of QEMU's `-drive`:
//! `readonly=on|off`, `direct=on|off` (O_DIRECT; `cache=none` is the same as `direct=on`),
//! `engine=auto|io_uring|sync` (`aio=` is accepted too). A comma inside a path is written `,,`.

use crate::Error;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use vstor_core::{BlockDevice, Engine, FileDevice, FileOptions};

/// What a target string names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetKind {
    /// A plain file or a block device.
    Raw(PathBuf),
    /// A VHDX file.
    Vhdx(PathBuf),
    /// A space of a pool: the directory of its member disks and the space's name.
    Pool {
        /// Directory of the member disks.
        dir: PathBuf,
        /// The space's name.
        name: String,
    },
}

/// Options of a target. `None` means "not given" (the caller's default applies).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TargetOptions {
    /// Open read-only.
    pub read_only: Option<bool>,
    /// Use O_DIRECT.
    pub direct: Option<bool>,
    /// The I/O engine of file backends.
    pub engine: Option<Engine>,
}

/// A parsed target string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetSpec {
    /// What it names.
    pub kind: TargetKind,
    /// Its options.
    pub options: TargetOptions,
}

/// An opened target: the device and anything the user should be told about how it was opened.
pub struct OpenedTarget {
    /// The stack.
    pub device: Arc<dyn BlockDevice>,
    /// Notes such as "the file system refuses O_DIRECT; using buffered I/O".
    pub notes: Vec<String>,
}

impl std::fmt::Debug for OpenedTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenedTarget")
            .field("device", &self.device.describe())
            .field("notes", &self.notes)
            .finish()
    }
}

/// Splits at single commas; `,,` is a literal comma.
fn split_commas(s: &str) -> Vec<String> {
    let mut parts = vec![String::new()];
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == ',' {
            if chars.peek() == Some(&',') {
                chars.next();
                parts.last_mut().expect("never empty").push(',');
            } else {
                parts.push(String::new());
            }
        } else {
            parts.last_mut().expect("never empty").push(c);
        }
    }
    parts
}

fn on_off(input: &str, key: &str, v: &str) -> Result<bool, Error> {
    match v {
        "on" | "true" | "yes" | "1" => Ok(true),
        "off" | "false" | "no" | "0" => Ok(false),
        _ => Err(target_err(input, format!("{key}={v}: expected on or off"))),
    }
}

fn target_err(input: &str, reason: impl Into<String>) -> Error {
    Error::Target {
        input: input.to_string(),
        reason: reason.into(),
    }
}

impl std::str::FromStr for TargetSpec {
    type Err = Error;

    fn from_str(input: &str) -> Result<Self, Error> {
        let mut parts = split_commas(input).into_iter();
        let head = parts.next().unwrap_or_default();
        if head.is_empty() {
            return Err(target_err(input, "no path"));
        }
        let kind = if let Some(p) = head.strip_prefix("raw:") {
            TargetKind::Raw(PathBuf::from(p))
        } else if let Some(p) = head.strip_prefix("vhdx:") {
            TargetKind::Vhdx(PathBuf::from(p))
        } else if let Some(p) = head.strip_prefix("pool:") {
            let (dir, name) = p
                .rsplit_once('/')
                .filter(|(d, n)| !d.is_empty() && !n.is_empty())
                .ok_or_else(|| target_err(input, "a pool target is pool:DIR/NAME"))?;
            TargetKind::Pool {
                dir: PathBuf::from(dir),
                name: name.to_string(),
            }
        } else {
            let path = PathBuf::from(&head);
            let ext = path
                .extension()
                .map(|e| e.to_string_lossy().to_ascii_lowercase());
            match ext.as_deref() {
                Some("vhdx" | "avhdx") => TargetKind::Vhdx(path),
                _ => TargetKind::Raw(path),
            }
        };
        if matches!(&kind, TargetKind::Raw(p) | TargetKind::Vhdx(p) if p.as_os_str().is_empty()) {
            return Err(target_err(input, "no path"));
        }
        let mut options = TargetOptions::default();
        for part in parts {
            let (k, v) = part
                .split_once('=')
                .ok_or_else(|| target_err(input, format!("option '{part}' is not key=value")))?;
            match k {
                "readonly" | "read-only" | "ro" => options.read_only = Some(on_off(input, k, v)?),
                "direct" => options.direct = Some(on_off(input, k, v)?),
                "cache" => {
                    options.direct = Some(match v {
                        "none" | "directsync" => true,
                        "writeback" | "writethrough" | "unsafe" => false,
                        _ => {
                            return Err(target_err(
                                input,
                                format!("cache={v}: expected none or writeback"),
                            ))
                        }
                    })
                }
                "engine" | "aio" => {
                    options.engine = Some(
                        v.parse()
                            .map_err(|e: vstor_core::Error| target_err(input, e.to_string()))?,
                    )
                }
                _ => {
                    return Err(target_err(
                        input,
                        format!("unknown option '{k}' (known: readonly, direct, cache, engine)"),
                    ))
                }
            }
        }
        Ok(TargetSpec { kind, options })
    }
}

impl TargetSpec {
    /// The file the target lives in (the member directory for a pool).
    pub fn path(&self) -> &Path {
        match &self.kind {
            TargetKind::Raw(p) | TargetKind::Vhdx(p) => p,
            TargetKind::Pool { dir, .. } => dir,
        }
    }

    /// Opens the stack the target names. Options on the target win over `defaults`.
    pub fn open(&self, defaults: &TargetOptions) -> Result<OpenedTarget, Error> {
        let pick = |t: Option<bool>, d: Option<bool>| t.or(d).unwrap_or(false);
        let read_only = pick(self.options.read_only, defaults.read_only);
        let direct = pick(self.options.direct, defaults.direct);
        let engine = self.options.engine.or(defaults.engine).unwrap_or_default();
        match &self.kind {
            TargetKind::Raw(path) => {
                let dev = FileDevice::open(
                    path,
                    &FileOptions {
                        read_only,
                        direct,
                        engine,
                        ring_entries: 0,
                        lock: false,
                        share_rw: false,
                    },
                )?;
                let notes = dev
                    .direct_fallback()
                    .into_iter()
                    .chain(dev.engine_fallback())
                    .map(str::to_string)
                    .collect();
                Ok(OpenedTarget {
                    device: Arc::new(dev),
                    notes,
                })
            }
            TargetKind::Vhdx(path) => {
                let opts = vstor_vhdx::OpenOptions {
                    read_only,
                    file: FileOptions {
                        read_only,
                        direct,
                        engine,
                        ring_entries: 0,
                        lock: false,
                        share_rw: false,
                    },
                    ..Default::default()
                };
                let disk = vstor_vhdx::Vhdx::open(path, &opts)?;
                let notes = disk.notes();
                Ok(OpenedTarget {
                    device: Arc::new(disk),
                    notes,
                })
            }
            TargetKind::Pool { dir, name } => {
                let file = FileOptions {
                    read_only,
                    direct,
                    engine,
                    ring_entries: 0,
                    // Pool::open_dir locks every member whatever this says.
                    lock: true,
                    share_rw: false,
                };
                let pool = vstor_spaces::Pool::open_dir(
                    dir,
                    &vstor_spaces::OpenOptions {
                        read_only,
                        ..Default::default()
                    },
                    &file,
                )?;
                let space = pool.open_space(name)?;
                Ok(OpenedTarget {
                    device: Arc::new(space),
                    notes: pool.info().notes,
                })
            }
        }
    }
}

/// Parses and opens a target string.
pub fn open_target(target: &str, defaults: &TargetOptions) -> Result<OpenedTarget, Error> {
    target.parse::<TargetSpec>()?.open(defaults)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> TargetSpec {
        s.parse().unwrap()
    }

    #[test]
    fn kinds() {
        assert_eq!(parse("disk.raw").kind, TargetKind::Raw("disk.raw".into()));
        assert_eq!(parse("/dev/sdb").kind, TargetKind::Raw("/dev/sdb".into()));
        assert_eq!(parse("raw:x.vhdx").kind, TargetKind::Raw("x.vhdx".into()));
        assert_eq!(parse("a/b.VHDX").kind, TargetKind::Vhdx("a/b.VHDX".into()));
        assert_eq!(parse("vhdx:disk").kind, TargetKind::Vhdx("disk".into()));
        assert_eq!(
            parse("pool:/srv/p/data").kind,
            TargetKind::Pool {
                dir: "/srv/p".into(),
                name: "data".into()
            }
        );
    }

    #[test]
    fn options() {
        let t = parse("d.raw,readonly=on,direct=off,engine=sync");
        assert_eq!(t.options.read_only, Some(true));
        assert_eq!(t.options.direct, Some(false));
        assert_eq!(t.options.engine, Some(Engine::Sync));
        assert_eq!(parse("d.raw,cache=none").options.direct, Some(true));
        assert_eq!(
            parse("d.raw,aio=io_uring").options.engine,
            Some(Engine::IoUring)
        );
        assert_eq!(parse("a,,b.raw").kind, TargetKind::Raw("a,b.raw".into()));
    }

    #[test]
    fn bad_targets_are_named() {
        for bad in [
            "",
            ",readonly=on",
            "d.raw,bogus=1",
            "d.raw,readonly",
            "d.raw,readonly=maybe",
            "d.raw,engine=fast",
            "pool:nodir",
            "pool:/x/",
            "raw:",
        ] {
            let e = bad.parse::<TargetSpec>().unwrap_err().to_string();
            assert!(
                e.starts_with(&format!("invalid target '{bad}'")),
                "{bad}: {e}"
            );
        }
    }

    proptest::proptest! {
        #[test]
        fn never_panics(input in "[a-z:/.,=_]{0,32}") {
            if let Ok(t) = input.parse::<TargetSpec>() {
                proptest::prop_assert!(!t.path().as_os_str().is_empty());
            }
        }

        #[test]
        fn commas_in_paths_round_trip(name in "[a-z,]{1,12}") {
            let escaped = name.replace(',', ",,");
            let t: TargetSpec = format!("raw:{escaped},readonly=on").parse().unwrap();
            proptest::prop_assert_eq!(t.kind, TargetKind::Raw(PathBuf::from(&name)));
            proptest::prop_assert_eq!(t.options.read_only, Some(true));
        }
    }
}
