//! The stack builder: one string names a stack, for the CLI, the VMM, the daemon and the API
//! alike. A target string parses into a [`TargetSpec`] (the base and the layers on it), and
//! [`TargetSpec::open`] turns that into one `Arc<dyn BlockDevice>`. Nothing else in vstor
//! builds stacks.
//!
//! ```text
//! BASE[,OPTION=VALUE...]
//!
//! BASE
//!   PATH                 a file or block device; its content decides the format (below)
//!   raw:PATH             a plain file or block device, whatever it holds
//!   vhdx:PATH            a VHDX image with its parent chain
//!   vhd:PATH             a legacy VHD (Virtual PC, qemu-img -f vpc), read-only
//!   pool:DIR/NAME        the space NAME of the pool whose member disks are in DIR
//!   dedup:STORE/NAME     the volume NAME of the dedup store STORE (vstor dedup create)
//!
//! OPTION
//!   readonly=on|off      open read-only (default: what the command needs)
//!   direct=on|off        O_DIRECT; cache=none is direct=on, cache=writeback direct=off
//!   engine=auto|io_uring|sync   the file I/O engine (aio= is accepted too)
//!   locking=on|off       image locks (default on): a writer has its files alone, readers
//!                        share; off is for people who know no one else writes
//!   share-rw=on|off      a writer lets readers in beside it (never a second writer)
//!   max-iops=N           QoS layer: cap in 8 KiB-normalized IOPS
//!   min-iops=N           QoS layer: reservation in 8 KiB-normalized IOPS
//!   model=hdd|none       serve a raw base with the timing of a 7,200 rpm disk (seek by
//!                        distance, rotation, 180 MB/s, one head: vstor_core::hdd)
//! ```
//!
//! A comma inside a path is written `,,`.
//!
//! **Formats are told by content.** An explicit prefix (`raw:`, `vhdx:`, `vhd:`) is always
//! honoured. A known extension (`.vhdx`, `.avhdx`, `.vhd`, `.avhd`, `.raw`) whose content
//! disagrees is an error naming both. Any other name (`.img`, `.bin`, `.vpc`, none) takes the
//! format its signature tells; qcow2, VMDK, VDI, QED and LUKS are refused by name. A raw disk
//! that was not named `raw:` refuses writes that would give it another format's signature
//! ([`ProbeGuard`](crate::probe::ProbeGuard)).

use crate::probe::{self, Detected, ProbeGuard};
use crate::Error;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use vstor_core::{BlockDevice, Engine, FileDevice, FileOptions};
use vstor_qos::{FlowId, Limits, PolicyId, PolicyKind, Qos, QosConfig, QosDevice};

/// The base of a stack: what a target string names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetKind {
    /// A plain file or a block device.
    Raw(PathBuf),
    /// A VHDX file.
    Vhdx(PathBuf),
    /// A legacy VHD file (read-only).
    Vhd(PathBuf),
    /// A file whose format its content will tell ([`TargetSpec::resolve`]).
    Probe(PathBuf),
    /// A space of a pool: the directory of its member disks and the space's name.
    Pool {
        /// Directory of the member disks.
        dir: PathBuf,
        /// The space's name.
        name: String,
    },
    /// A volume of a dedup store (inline dedup): the store's directory and the volume's name.
    Dedup {
        /// The store's directory.
        store: PathBuf,
        /// The volume's name.
        name: String,
    },
}

/// How the format of a target was (or will be) decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FormatSource {
    /// An explicit prefix (`raw:`, `vhdx:`, `vhd:`, `pool:`, `dedup:`).
    Prefix,
    /// A known extension, checked against the content.
    Extension,
    /// The content's signature (no prefix, no known extension).
    Content,
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
    /// Take image locks (default on).
    pub locking: Option<bool>,
    /// A writer lets readers in beside it.
    pub share_rw: Option<bool>,
    /// Serve the base file with the timing of a rotating disk (`model=hdd`; raw bases).
    pub hdd: bool,
}

/// The QoS layer on top of a base.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QosLayer {
    /// The flow's own limits (a dedicated policy), used when `policy` is None.
    pub limits: Limits,
    /// Join this existing policy of the context's scheduler instead (an aggregated group).
    pub policy: Option<PolicyId>,
    /// The flow's weight (0: the default).
    pub weight: u64,
    /// The flow's name in the statistics (default: the target string).
    pub name: Option<String>,
}

/// A parsed target string: a base, its options, and the layers on top.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetSpec {
    /// The base.
    pub kind: TargetKind,
    /// How its format is decided.
    pub source: FormatSource,
    /// Options of the base.
    pub options: TargetOptions,
    /// A QoS layer, if any.
    pub qos: Option<QosLayer>,
}

/// What stacks opened together share: the QoS scheduler their QoS layers become flows of (one
/// per host, as a hypervisor has). A fresh context makes its scheduler on first use.
#[derive(Default, Clone)]
pub struct StackContext {
    /// The scheduler.
    pub qos: Option<Arc<Qos>>,
    /// Open a writable VHDX as a [`LiveDisk`](vstor_vhdx::live::LiveDisk), which can be
    /// checkpointed, merged back and cloned while in use (what a daemon serving it needs). It
    /// honours the target's file options (direct, engine, locking, share-rw).
    pub live_vhdx: bool,
}

/// The QoS layer of an opened stack: its scheduler, policy and flow (to change limits and read
/// statistics at run time).
#[derive(Clone)]
pub struct QosHandle {
    /// The scheduler.
    pub qos: Arc<Qos>,
    /// The policy the flow is under.
    pub policy: PolicyId,
    /// The flow.
    pub flow: FlowId,
}

/// An opened target: the device and anything the user should be told about how it was opened.
pub struct OpenedTarget {
    /// The stack.
    pub device: Arc<dyn BlockDevice>,
    /// Notes such as "the file system refuses O_DIRECT; using buffered I/O".
    pub notes: Vec<String>,
    /// The base's format.
    pub format: Detected,
    /// How the format was decided, in words ("by its content", ...).
    pub format_decided: String,
    /// The QoS layer, if the stack has one.
    pub qos: Option<QosHandle>,
    /// The live disk at the base, when the context asked for one and the base is a writable
    /// VHDX.
    pub live: Option<Arc<vstor_vhdx::live::LiveDisk>>,
}

impl std::fmt::Debug for OpenedTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenedTarget")
            .field("device", &self.device.describe())
            .field("notes", &self.notes)
            .field("format", &self.format)
            .field("format_decided", &self.format_decided)
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

/// The format a file name's extension claims, if it is one vstor knows.
pub fn format_of_extension(path: &Path) -> Option<Detected> {
    let ext = path.extension()?.to_string_lossy().to_ascii_lowercase();
    match ext.as_str() {
        "vhdx" | "avhdx" => Some(Detected::Vhdx),
        "vhd" | "avhd" => Some(Detected::Vhd),
        "raw" => Some(Detected::Raw),
        _ => None,
    }
}

const KNOWN_OPTIONS: &str =
    "readonly, direct, cache, engine, locking, share-rw, max-iops, min-iops, model";

impl std::str::FromStr for TargetSpec {
    type Err = Error;

    fn from_str(input: &str) -> Result<Self, Error> {
        let mut parts = split_commas(input).into_iter();
        let head = parts.next().unwrap_or_default();
        if head.is_empty() {
            return Err(target_err(input, "no path"));
        }
        let (kind, source) = if let Some(p) = head.strip_prefix("raw:") {
            (TargetKind::Raw(PathBuf::from(p)), FormatSource::Prefix)
        } else if let Some(p) = head.strip_prefix("vhdx:") {
            (TargetKind::Vhdx(PathBuf::from(p)), FormatSource::Prefix)
        } else if let Some(p) = head.strip_prefix("vhd:") {
            (TargetKind::Vhd(PathBuf::from(p)), FormatSource::Prefix)
        } else if let Some(p) = head.strip_prefix("pool:") {
            let (dir, name) = p
                .rsplit_once('/')
                .filter(|(d, n)| !d.is_empty() && !n.is_empty())
                .ok_or_else(|| target_err(input, "a pool target is pool:DIR/NAME"))?;
            (
                TargetKind::Pool {
                    dir: PathBuf::from(dir),
                    name: name.to_string(),
                },
                FormatSource::Prefix,
            )
        } else if let Some(p) = head.strip_prefix("dedup:") {
            let (store, name) = p
                .rsplit_once('/')
                .filter(|(d, n)| !d.is_empty() && !n.is_empty())
                .ok_or_else(|| target_err(input, "a dedup target is dedup:STORE/NAME"))?;
            (
                TargetKind::Dedup {
                    store: PathBuf::from(store),
                    name: name.to_string(),
                },
                FormatSource::Prefix,
            )
        } else {
            let spec = TargetSpec::for_path(Path::new(&head));
            (spec.kind, spec.source)
        };
        if matches!(&kind, TargetKind::Raw(p) | TargetKind::Vhdx(p) | TargetKind::Vhd(p)
            | TargetKind::Probe(p) if p.as_os_str().is_empty())
        {
            return Err(target_err(input, "no path"));
        }
        let mut options = TargetOptions::default();
        let mut qos: Option<QosLayer> = None;
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
                "locking" | "file.locking" => options.locking = Some(on_off(input, k, v)?),
                "share-rw" => options.share_rw = Some(on_off(input, k, v)?),
                "model" => match v {
                    "hdd" => options.hdd = true,
                    "none" => options.hdd = false,
                    _ => {
                        return Err(target_err(
                            input,
                            format!("model={v}: expected hdd or none"),
                        ))
                    }
                },
                "max-iops" | "min-iops" => {
                    let n: u64 = v.parse().map_err(|_| {
                        target_err(input, format!("{k}={v}: expected a whole number of IOPS"))
                    })?;
                    let layer = qos.get_or_insert_with(QosLayer::default);
                    if k == "max-iops" {
                        layer.limits.max_iops = n;
                    } else {
                        layer.limits.min_iops = n;
                    }
                }
                _ => {
                    return Err(target_err(
                        input,
                        format!("unknown option '{k}' (known: {KNOWN_OPTIONS})"),
                    ))
                }
            }
        }
        if let Some(l) = &qos {
            l.limits
                .validate()
                .map_err(|e| target_err(input, e.to_string()))?;
        }
        if options.hdd && !matches!(kind, TargetKind::Raw(_)) {
            return Err(target_err(
                input,
                "model=hdd applies to a raw base here (raw:PATH,model=hdd); a pool's members \
                 do not take a model yet",
            ));
        }
        Ok(TargetSpec {
            kind,
            source,
            options,
            qos,
        })
    }
}

impl TargetSpec {
    /// The target a bare file name names, without the target grammar (a comma or a `raw:` in
    /// it is part of the name): its format by a known extension, checked against the content
    /// by [`resolve`](Self::resolve), or by the content alone.
    pub fn for_path(path: &Path) -> TargetSpec {
        let p = path.to_path_buf();
        let (kind, source) = match format_of_extension(path) {
            Some(Detected::Vhdx) => (TargetKind::Vhdx(p), FormatSource::Extension),
            Some(Detected::Vhd) => (TargetKind::Vhd(p), FormatSource::Extension),
            Some(_) => (TargetKind::Raw(p), FormatSource::Extension),
            None => (TargetKind::Probe(p), FormatSource::Content),
        };
        TargetSpec {
            kind,
            source,
            options: TargetOptions::default(),
            qos: None,
        }
    }

    /// The file the target lives in (the member directory for a pool).
    pub fn path(&self) -> &Path {
        match &self.kind {
            TargetKind::Raw(p)
            | TargetKind::Vhdx(p)
            | TargetKind::Vhd(p)
            | TargetKind::Probe(p) => p,
            TargetKind::Pool { dir, .. } => dir,
            TargetKind::Dedup { store, .. } => store,
        }
    }

    /// Decides the format from the content where the target leaves it open, and checks that a
    /// known extension agrees with the content: the returned spec is never
    /// [`TargetKind::Probe`]. Nothing is written. A file that does not exist keeps what its
    /// name says (a probed one is raw), so that commands that create files can use this too.
    pub fn resolve(&self) -> Result<TargetSpec, Error> {
        let mut out = self.clone();
        if self.source == FormatSource::Prefix {
            // An explicit image format whose content is something else: say both (raw: and
            // pool: take whatever is there).
            let named = match &self.kind {
                TargetKind::Vhdx(p) => Some((Detected::Vhdx, p)),
                TargetKind::Vhd(p) => Some((Detected::Vhd, p)),
                _ => None,
            };
            if let Some((named, path)) = named.filter(|(_, p)| p.exists()) {
                let found = probe::probe(path)?;
                if found != named {
                    return Err(Error::Unsupported(format!(
                        "{} was named {} (by the {}: prefix) but its content is {}{}",
                        path.display(),
                        named.name(),
                        prefix(named),
                        found.name(),
                        match found {
                            Detected::Raw => " (no signature of any image format)".to_string(),
                            Detected::Foreign(_) => String::new(),
                            other => format!("; open it as {}:{}", prefix(other), path.display()),
                        }
                    )));
                }
            }
            return Ok(out);
        }
        let path = self.path();
        if is_stub_file(path) {
            // An optimized (dedup) file: open_base tells the format of the bytes it stands for.
            return Ok(out);
        }
        if !path.exists() {
            if let TargetKind::Probe(p) = &self.kind {
                out.kind = TargetKind::Raw(p.clone());
            }
            return Ok(out);
        }
        let found = probe::probe(path)?;
        if let Detected::Foreign(name) = found {
            return Err(Error::Unsupported(format!(
                "{} is a {name} image, which vstor does not open (convert it with qemu-img \
                 convert -O vhdx, or name it raw:{} to treat its bytes as a raw disk)",
                path.display(),
                path.display()
            )));
        }
        if self.source == FormatSource::Extension {
            let named = format_of_extension(path).expect("an extension source has one");
            if named != found {
                return Err(Error::Unsupported(format!(
                    "{} is named as {} (by its extension) but its content is {}{}; rename it, \
                     or say which you mean with {}:{}",
                    path.display(),
                    named.name(),
                    found.name(),
                    match found {
                        Detected::Raw => " (no signature of any image format)",
                        _ => "",
                    },
                    prefix(found),
                    path.display()
                )));
            }
            return Ok(out);
        }
        out.kind = match found {
            Detected::Vhdx => TargetKind::Vhdx(path.to_path_buf()),
            Detected::Vhd => TargetKind::Vhd(path.to_path_buf()),
            _ => TargetKind::Raw(path.to_path_buf()),
        };
        Ok(out)
    }

    /// How the format was decided, in words, for `disk info`.
    pub fn format_decided(&self) -> &'static str {
        match (self.source, &self.kind) {
            (_, TargetKind::Pool { .. }) => "a pool space (pool: prefix)",
            (_, TargetKind::Dedup { .. }) => "a dedup volume (dedup: prefix)",
            (FormatSource::Prefix, _) => "by the explicit prefix",
            (FormatSource::Extension, _) => "by its extension, and its content agrees",
            (FormatSource::Content, _) => "by its content (signature probe)",
        }
    }

    /// Opens the stack the target names, on a scheduler of its own if it has a QoS layer.
    /// Options on the target win over `defaults`.
    pub fn open(&self, defaults: &TargetOptions) -> Result<OpenedTarget, Error> {
        self.open_in(defaults, &mut StackContext::default())
    }

    /// Opens the stack the target names; its QoS layer (if any) becomes a flow of the
    /// context's scheduler, so that stacks opened in one context share it.
    pub fn open_in(
        &self,
        defaults: &TargetOptions,
        ctx: &mut StackContext,
    ) -> Result<OpenedTarget, Error> {
        let spec = self.resolve()?;
        let mut opened = match &spec.kind {
            TargetKind::Vhdx(path)
                if ctx.live_vhdx
                    && !is_stub_file(path)
                    && !spec
                        .options
                        .read_only
                        .or(defaults.read_only)
                        .unwrap_or(false) =>
            {
                let opts = vstor_vhdx::OpenOptions {
                    file: spec.file_options(defaults, false),
                    ..Default::default()
                };
                let live = Arc::new(vstor_vhdx::live::LiveDisk::open_with(path, &opts)?);
                OpenedTarget {
                    device: live.clone(),
                    notes: live.current().notes(),
                    format: Detected::Vhdx,
                    format_decided: spec.format_decided().to_string(),
                    qos: None,
                    live: Some(live),
                }
            }
            _ => spec.open_base(defaults)?,
        };
        if let Some(layer) = &spec.qos {
            let name = layer
                .name
                .clone()
                .unwrap_or_else(|| spec.path().display().to_string());
            let qos = ctx
                .qos
                .get_or_insert_with(|| Qos::new(QosConfig::default()))
                .clone();
            let policy = match layer.policy {
                Some(p) => p,
                None => qos.add_policy(&name, PolicyKind::Dedicated, layer.limits)?,
            };
            let flow = qos.add_flow(&name, Some(policy), layer.weight)?;
            opened.device = Arc::new(QosDevice::new(qos.clone(), flow, opened.device)?);
            opened.qos = Some(QosHandle { qos, policy, flow });
        }
        Ok(opened)
    }

    /// The file options of the base: the target's own options, else `defaults`, else the
    /// built-in defaults.
    fn file_options(&self, defaults: &TargetOptions, read_only: bool) -> FileOptions {
        let pick = |t: Option<bool>, d: Option<bool>, dflt: bool| t.or(d).unwrap_or(dflt);
        let o = &self.options;
        FileOptions {
            read_only,
            direct: pick(o.direct, defaults.direct, false),
            engine: o.engine.or(defaults.engine).unwrap_or_default(),
            ring_entries: 0,
            lock: pick(o.locking, defaults.locking, true),
            share_rw: pick(o.share_rw, defaults.share_rw, false),
            keep_writers_out: false,
        }
    }

    fn open_base(&self, defaults: &TargetOptions) -> Result<OpenedTarget, Error> {
        let read_only = self
            .options
            .read_only
            .or(defaults.read_only)
            .unwrap_or(false);
        let file = self.file_options(defaults, read_only);
        let decided = self.format_decided().to_string();
        let done = |device: Arc<dyn BlockDevice>, notes: Vec<String>, format: Detected| {
            Ok(OpenedTarget {
                device,
                notes,
                format,
                format_decided: decided.clone(),
                qos: None,
                live: None,
            })
        };
        if let Some(opened) = self.open_stub(read_only, &file)? {
            return Ok(opened);
        }
        match &self.kind {
            TargetKind::Raw(path) => {
                let dev = FileDevice::open(path, &file)?;
                let notes = dev
                    .direct_fallback()
                    .into_iter()
                    .chain(dev.engine_fallback())
                    .map(str::to_string)
                    .collect();
                let dev: Arc<dyn BlockDevice> = Arc::new(dev);
                let dev: Arc<dyn BlockDevice> = if self.options.hdd {
                    Arc::new(vstor_core::HddDevice::new(
                        dev,
                        vstor_core::HddModel::default(),
                    ))
                } else {
                    dev
                };
                let dev: Arc<dyn BlockDevice> = if self.source == FormatSource::Prefix {
                    dev
                } else {
                    let mut guard = ProbeGuard::new(dev, path.display().to_string());
                    if std::fs::metadata(path).is_ok_and(|m| m.is_file()) {
                        guard = guard.with_file(path);
                    }
                    Arc::new(guard)
                };
                done(dev, notes, Detected::Raw)
            }
            TargetKind::Vhdx(path) => {
                let opts = vstor_vhdx::OpenOptions {
                    read_only,
                    file,
                    ..Default::default()
                };
                let disk = vstor_vhdx::Vhdx::open(path, &opts)?;
                let notes = disk.notes();
                done(Arc::new(disk), notes, Detected::Vhdx)
            }
            TargetKind::Vhd(path) => {
                let disk = vstor_vhdx::vpc::Vpc::open(path)?;
                let mut notes = Vec::new();
                if !read_only {
                    notes.push(format!(
                        "{} is a legacy VHD, which vstor opens read-only (convert it to VHDX \
                         to write to it)",
                        path.display()
                    ));
                }
                done(Arc::new(disk), notes, Detected::Vhd)
            }
            TargetKind::Probe(_) => unreachable!("resolve() decides every probed format"),
            TargetKind::Pool { dir, name } => {
                // Pool::open_dir locks every member whatever `locking` says.
                let file = FileOptions { lock: true, ..file };
                let pool = vstor_spaces::Pool::open_dir(
                    dir,
                    &vstor_spaces::OpenOptions {
                        read_only,
                        ..Default::default()
                    },
                    &file,
                )?;
                let space = pool.open_space(name)?;
                done(Arc::new(space), pool.info().notes, Detected::Raw)
            }
            TargetKind::Dedup { store, name } => {
                // The store is opened once per process and locked for it, whatever `locking`
                // says: its index has one writer.
                let vs =
                    vstor_dedup::VolumeStore::shared(store).map_err(vstor_core::Error::from)?;
                let vol = vs
                    .open_volume(name, read_only)
                    .map_err(vstor_core::Error::from)?;
                done(Arc::new(vol), Vec::new(), Detected::Raw)
            }
        }
    }
}

/// An optimized file's byte device and what its bytes are ([`open_stub_probed`]).
pub type StubSource = (Arc<dyn BlockDevice>, Detected);

/// The stub of an optimized (dedup) file at `path` opened as a byte device (chunks from the
/// library's store and the writes made since; `lock`: it takes the file's image locks), and
/// what its bytes are. `None` when `path` is not a stub.
pub fn open_stub_probed(
    path: &Path,
    read_only: bool,
    lock: bool,
) -> Result<Option<StubSource>, Error> {
    if !is_stub_file(path) {
        return Ok(None);
    }
    let dev =
        vstor_dedup::StubDevice::open(path, read_only, lock).map_err(vstor_core::Error::from)?;
    let dev: Arc<dyn BlockDevice> = Arc::new(dev);
    let cap = dev.capacity();
    let mut head = vec![0u8; (probe::HEAD as u64).min(cap) as usize];
    let mut tail = vec![0u8; (probe::TAIL as u64).min(cap) as usize];
    dev.read_at(0, &mut head)?;
    dev.read_at(cap - tail.len() as u64, &mut tail)?;
    Ok(Some((dev, probe::detect(&head, &tail))))
}

impl TargetSpec {
    /// An optimized (dedup) file: the stub's byte device (chunks from the library's store and
    /// the writes made since), with the VHDX layer on it when its content is a VHDX. `None`
    /// when the target is not a stub.
    fn open_stub(
        &self,
        read_only: bool,
        file: &FileOptions,
    ) -> Result<Option<OpenedTarget>, Error> {
        let path = match &self.kind {
            TargetKind::Raw(p) | TargetKind::Vhdx(p) | TargetKind::Probe(p) => p,
            _ => return Ok(None),
        };
        let Some((dev, found)) = open_stub_probed(path, read_only, file.lock)? else {
            return Ok(None);
        };
        let named = match (&self.kind, self.source) {
            (TargetKind::Vhdx(_), _) => Some(Detected::Vhdx),
            (TargetKind::Raw(_), FormatSource::Prefix) => None,
            (TargetKind::Raw(_), _) => Some(Detected::Raw),
            _ => None,
        };
        if let Some(n) = named.filter(|n| *n != found) {
            return Err(Error::Unsupported(format!(
                "{} (an optimized dedup file) is named as {} but its content is {}",
                path.display(),
                n.name(),
                found.name()
            )));
        }
        let decided = format!("{}; an optimized (dedup) file", self.format_decided());
        let opened = |device: Arc<dyn BlockDevice>, format| OpenedTarget {
            device,
            notes: vec![],
            format,
            format_decided: decided.clone(),
            qos: None,
            live: None,
        };
        match found {
            Detected::Vhdx if !matches!(self.kind, TargetKind::Raw(_)) => {
                let opts = vstor_vhdx::OpenOptions {
                    read_only,
                    file: file.clone(),
                    ..Default::default()
                };
                let disk =
                    vstor_vhdx::Vhdx::open_on(dev, &path.display().to_string(), &opts, None)?;
                Ok(Some(opened(Arc::new(disk), Detected::Vhdx)))
            }
            Detected::Vhd | Detected::Foreign(_) => Err(Error::Unsupported(format!(
                "{} is an optimized (dedup) {} image, which vstor opens only as VHDX or raw",
                path.display(),
                found.name()
            ))),
            _ => Ok(Some(opened(dev, Detected::Raw))),
        }
    }
}

/// The prefix that names a format explicitly.
fn prefix(d: Detected) -> &'static str {
    match d {
        Detected::Vhdx => "vhdx",
        Detected::Vhd => "vhd",
        _ => "raw",
    }
}

/// Parses and opens a target string.
pub fn open_target(target: &str, defaults: &TargetOptions) -> Result<OpenedTarget, Error> {
    target.parse::<TargetSpec>()?.open(defaults)
}

/// Whether `path` is an optimized (dedup) file: a regular file that starts with a stub's
/// signature. Only a regular file is looked into: reading a FIFO or a device to look would
/// block or consume what it holds.
pub fn is_stub_file(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.is_file())
        && vstor_dedup::stub::file_is_stub(&vstor_dedup::vfs::RealFs, path)
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
        assert_eq!(parse("/dev/sdb").kind, TargetKind::Probe("/dev/sdb".into()));
        assert_eq!(parse("d.img").kind, TargetKind::Probe("d.img".into()));
        assert_eq!(parse("d.vpc").kind, TargetKind::Probe("d.vpc".into()));
        assert_eq!(parse("d.vhd").kind, TargetKind::Vhd("d.vhd".into()));
        assert_eq!(parse("vhd:d.img").kind, TargetKind::Vhd("d.img".into()));
        assert_eq!(parse("d.raw").source, FormatSource::Extension);
        assert_eq!(parse("raw:d.raw").source, FormatSource::Prefix);
        assert_eq!(parse("raw:x.vhdx").kind, TargetKind::Raw("x.vhdx".into()));
        assert_eq!(parse("a/b.VHDX").kind, TargetKind::Vhdx("a/b.VHDX".into()));
        assert_eq!(parse("vhdx:disk").kind, TargetKind::Vhdx("disk".into()));
        assert_eq!(
            parse("dedup:/srv/vols/vm1,readonly=on").kind,
            TargetKind::Dedup {
                store: "/srv/vols".into(),
                name: "vm1".into()
            }
        );
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
        let t = parse("d.raw,locking=off,share-rw=on,max-iops=500,min-iops=100");
        assert_eq!(t.options.locking, Some(false));
        assert_eq!(t.options.share_rw, Some(true));
        let q = t.qos.unwrap();
        assert_eq!((q.limits.max_iops, q.limits.min_iops), (500, 100));
        assert!(parse("d.raw").qos.is_none());
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
            "dedup:nostore",
            "dedup:/s/",
            "dedup:/v",
            "raw:",
            "vhd:",
            "d.raw,max-iops=lots",
            "d.raw,max-iops=10,min-iops=20",
            "d.raw,locking=maybe",
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
