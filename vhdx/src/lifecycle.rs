//! Operations on whole chains: merge, reparent, checkpoint, clone (the Merge-VHD, Set-VHD and
//! checkpoint verbs of Hyper-V, and qemu-img commit/rebase).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use vstor_core::{BlockDevice, Error, Job, Result};

use crate::convert::{self, copy_all, ConvertOptions, ConvertReport};
use crate::create::{self, CreateOptions};
use crate::disk::{OpenOptions, Vhdx};
use crate::error::{invalid, VhdxError};
use crate::format::Guid;

/// What a merge did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MergeReport {
    /// The image that received the data.
    pub into: PathBuf,
    /// The images folded into it and removed, child first.
    pub removed: Vec<PathBuf>,
    /// Bytes copied (data of the merged images; the ancestor's own data is not rewritten).
    pub copied_bytes: u64,
    /// The virtual size of the result.
    pub size: u64,
}

/// A merge in progress, as its target records it in vstor's optional metadata item
/// [`crate::format::MERGE_MARKER`] ([`Vhdx::merge_marker`]).
///
/// While it is there, the target holds part of the merged disks' data, so only an open of the
/// merge's own top (or of a disk above it) reads the chain as it was: a child of the target is
/// accepted over it only when the open's chain ends with exactly the merged disks, top first.
/// Every other child (a sibling of the merged disk, a merged disk in the middle opened on its
/// own) is refused with [`VhdxError::MergePending`], which says how to finish the merge. Disks
/// are told apart by their page-83 identifier, which every create draws anew: a byte copy of
/// the merged disk (made with `cp`) has the same one and is not told apart from it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MergeMarker {
    /// The target's DataWriteGuid from before the merge: the parent linkage that the disk right
    /// above it records (and that its siblings record too).
    pub linkage: Guid,
    /// The merged disks, the merge's top first and the disk right above the target last: each
    /// one's page-83 identifier and its path (for messages). Empty in a marker written by an
    /// older vstor, which recorded `linkage` only.
    pub merged: Vec<(Guid, String)>,
}

/// The tag after the linkage in a marker that names its merged disks.
const MARKER_TAG: &[u8; 4] = b"vsm2";
/// The most merged disks a marker names (the deepest chain an open accepts is smaller).
const MARKER_MAX_DISKS: usize = 256;
/// The longest path a marker keeps (a longer one is kept as its file name).
const MARKER_MAX_PATH: usize = 1024;

impl MergeMarker {
    /// The item's bytes: the linkage, then (unless `merged` is empty) the tag, the count, and
    /// each disk's identifier, path length (u16) and path.
    pub(crate) fn to_bytes(&self) -> Vec<u8> {
        let mut b = self.linkage.0.to_vec();
        if self.merged.is_empty() {
            return b;
        }
        b.extend_from_slice(MARKER_TAG);
        let n = self.merged.len().min(MARKER_MAX_DISKS);
        b.extend_from_slice(&(n as u32).to_le_bytes());
        for (id, path) in &self.merged[..n] {
            let path = if path.len() > MARKER_MAX_PATH {
                Path::new(path)
                    .file_name()
                    .map(|f| f.to_string_lossy().to_string())
                    .unwrap_or_default()
            } else {
                path.clone()
            };
            let path = &path.as_bytes()[..path.len().min(MARKER_MAX_PATH)];
            b.extend_from_slice(&id.0);
            b.extend_from_slice(&(path.len() as u16).to_le_bytes());
            b.extend_from_slice(path);
        }
        b
    }

    /// Parses the item's bytes: `None` when it is too short to hold a linkage. A tail that does
    /// not parse leaves a marker that names no disk (as an older vstor's), which admits no
    /// child but a merge's own open ([`admit`]).
    pub(crate) fn from_bytes(d: &[u8]) -> Option<MergeMarker> {
        let linkage = Guid(d.get(..16)?.try_into().ok()?);
        let merged = Self::parse_disks(&d[16..]).unwrap_or_default();
        Some(MergeMarker { linkage, merged })
    }

    fn parse_disks(d: &[u8]) -> Option<Vec<(Guid, String)>> {
        if d.get(..4)? != MARKER_TAG {
            return None;
        }
        let n = u32::from_le_bytes(d.get(4..8)?.try_into().ok()?) as usize;
        if n == 0 || n > MARKER_MAX_DISKS {
            return None;
        }
        let mut at = 8;
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            let id = Guid(d.get(at..at + 16)?.try_into().ok()?);
            let l = u16::from_le_bytes(d.get(at + 16..at + 18)?.try_into().ok()?) as usize;
            let p = d.get(at + 18..at + 18 + l)?;
            out.push((id, String::from_utf8_lossy(p).to_string()));
            at += 18 + l;
        }
        Some(out)
    }

    /// The command that finishes the merge.
    fn finish_command(&self, target: &str) -> Option<String> {
        let (_, top) = self.merged.first()?;
        Some(if self.merged.len() > 1 {
            format!("vstor disk merge {top} --into {target}")
        } else {
            format!("vstor disk merge {top}")
        })
    }
}

/// Whether the child `child` (whose linkage is the marker's) may be opened over the target
/// `target` that holds the marker `m`: `chain` is the page-83 identifiers of this open's disks
/// from its top down to `child`. A merge's own open (`merging`) also passes a marker of an
/// older vstor, which does not say which disk it merges.
pub(crate) fn admit(
    m: &MergeMarker,
    child: &str,
    target: &str,
    chain: &[Guid],
    merging: bool,
) -> Result<()> {
    if m.merged.is_empty() {
        if merging {
            return Ok(());
        }
        return Err(VhdxError::MergePending {
            child: child.to_string(),
            target: target.to_string(),
            top: "a disk".into(),
            finish: format!("run `vstor disk merge` again on the disk that was being merged into {target} (an older vstor began it and did not record which)"),
        }
        .into());
    }
    let ids: Vec<Guid> = m.merged.iter().map(|(g, _)| *g).collect();
    if chain.ends_with(&ids) {
        return Ok(());
    }
    Err(VhdxError::MergePending {
        child: child.to_string(),
        target: target.to_string(),
        top: m.merged[0].1.clone(),
        finish: format!(
            "run `{}` to finish it",
            m.finish_command(target).expect("named disks")
        ),
    }
    .into())
}

fn canon(p: &Path) -> Result<PathBuf> {
    std::fs::canonicalize(p).map_err(|e| Error::io(format!("cannot open {}", p.display()), e))
}

/// The chain of an open image, child first: (path, image).
fn chain(top: &Arc<Vhdx>) -> Vec<Arc<Vhdx>> {
    let mut out = vec![top.clone()];
    while let Some(p) = out.last().and_then(|v| v.parent().cloned()) {
        out.push(p);
    }
    out
}

/// Folds the differencing disk `child` into its parent, or into the ancestor `into`: every
/// sector the child (and the disks between) holds is written into the ancestor, nothing the
/// ancestor already holds is rewritten, and the merged disks are deleted. The ancestor grows
/// first when the child is larger. Offline: nothing else may have these files open.
///
/// The ancestor carries a [`MergeMarker`] while the merge runs: an interrupted merge (a crash,
/// an error, a cancellation) leaves `child` reading as it did, and running the same merge again
/// finishes it; every other child of the ancestor is refused until then. The marker is removed
/// once everything is copied and flushed, before the merged disks are deleted: from then on
/// they no longer match the ancestor (its DataWriteGuid changed with the copy), so one whose
/// removal failed is refused rather than read over the merged data.
pub fn merge(child: &Path, into: Option<&Path>, job: &Job) -> Result<MergeReport> {
    let top = Arc::new(Vhdx::open_for_merge(child, &OpenOptions::read_only())?);
    let links = chain(&top);
    if links.len() < 2 {
        return Err(invalid(format!(
            "{} is not a differencing disk: there is nothing to merge it into",
            child.display()
        )));
    }
    let depth = match into {
        None => 1,
        Some(a) => {
            let want = canon(a)?;
            let mut found = None;
            for (i, l) in links.iter().enumerate().skip(1) {
                if let Some(p) = l.path() {
                    if canon(p)? == want {
                        found = Some(i);
                        break;
                    }
                }
            }
            found.ok_or_else(|| {
                invalid(format!(
                    "{} is not an ancestor of {} (its chain is {})",
                    a.display(),
                    child.display(),
                    links
                        .iter()
                        .map(|l| l.name().to_string())
                        .collect::<Vec<_>>()
                        .join(" -> ")
                ))
            })?
        }
    };
    let target_path = links[depth]
        .path()
        .ok_or_else(|| invalid("the ancestor has no path"))?
        .to_path_buf();
    let removed: Vec<PathBuf> = links[..depth]
        .iter()
        .filter_map(|l| l.path().map(Path::to_path_buf))
        .collect();
    let size = top.capacity();
    let target = Vhdx::open(&target_path, &OpenOptions::default())?;
    let copied = merge_into(&top, depth, &target, job)?;
    drop(links);
    drop(top);
    target.set_merge_marker(None)?;
    target.close()?;
    drop(target);
    for p in &removed {
        std::fs::remove_file(p).map_err(|e| {
            Error::io(
                format!(
                    "merged into {}, but cannot remove {} (it no longer matches its parent: delete it)",
                    target_path.display(),
                    p.display()
                ),
                e,
            )
        })?;
    }
    Ok(MergeReport {
        into: target_path,
        removed,
        copied_bytes: copied,
        size,
    })
}

/// The device-level merge: writes what `top` and the disks down to `depth - 1` hold into
/// `target` (the ancestor `depth` levels below `top`, opened writable on its own), marked with a
/// [`MergeMarker`] that keeps `top` (and only `top`) openable over `target` until the caller
/// clears it (`target.set_merge_marker(None)`), which it does once this returned, before it
/// removes the merged disks. Returns the bytes copied.
pub fn merge_into(top: &Vhdx, depth: usize, target: &Vhdx, job: &Job) -> Result<u64> {
    let mut merged = Vec::with_capacity(depth);
    let mut above: &Vhdx = top;
    for i in 0..depth {
        if i > 0 {
            above = above
                .parent()
                .ok_or_else(|| invalid("the chain is shorter than the merge depth"))?;
        }
        let path = match above.path() {
            Some(p) => std::path::absolute(p)
                .unwrap_or_else(|_| p.to_path_buf())
                .display()
                .to_string(),
            None => above.name().to_string(),
        };
        merged.push((above.metadata().page83, path));
    }
    // The marker keeps the merge's top openable (as it was) until the merge is done: an
    // interrupted merge leaves it readable and can be run again.
    let linkage = above
        .metadata()
        .parent
        .as_ref()
        .and_then(|l| l.get("parent_linkage"))
        .and_then(|s| uuid::Uuid::parse_str(s.trim_matches(|c| c == '{' || c == '}')).ok())
        .map(Guid::from_uuid)
        .ok_or_else(|| invalid("the disk above the target records no parent linkage"))?;
    let marker = MergeMarker { linkage, merged };
    if target.merge_marker().as_ref() != Some(&marker) {
        target.set_merge_marker(Some(&marker))?;
    }
    let size = top.capacity();
    if target.capacity() < size {
        target.resize_with(size, &Job::new())?;
    }
    let map = |off: u64, len: u64| top.fills(off, len, Some(depth));
    let rep = copy_all(top, Some(&map), target, false, job)?;
    target.flush()?;
    Ok(rep.written_bytes)
}

/// Points the differencing disk `child` at `new_parent`. The new parent must be the disk the
/// child was made from (its DataWriteGuid equals the child's recorded linkage: a moved or
/// renamed parent), unless `ignore_linkage`, in which case the child is linked to the new
/// parent as it is. Refuses a parent whose chain contains the child (a cycle).
pub fn set_parent(child: &Path, new_parent: &Path, ignore_linkage: bool) -> Result<()> {
    let me = canon(child)?;
    let parent = Arc::new(Vhdx::open(new_parent, &OpenOptions::read_only())?);
    for l in chain(&parent) {
        if let Some(p) = l.path() {
            if canon(p)? == me {
                return Err(VhdxError::ChainCycle(me).into());
            }
        }
    }
    let look = OpenOptions {
        read_only: true,
        ignore_linkage: true,
        ..Default::default()
    };
    let current = Vhdx::open_with_parent(child, &look, parent.clone())?;
    let recorded = current
        .metadata()
        .parent
        .as_ref()
        .and_then(|l| l.get("parent_linkage").map(str::to_string))
        .unwrap_or_default();
    drop(current);
    let have = parent.data_write_guid();
    let norm = |s: &str| {
        s.trim_matches(|c| c == '{' || c == '}')
            .to_ascii_lowercase()
    };
    if !ignore_linkage && norm(&recorded) != have.to_uuid().to_string() {
        return Err(VhdxError::LinkageMismatch {
            child: child.display().to_string(),
            parent: new_parent.display().to_string(),
            expected: recorded,
            found: format!("{{{}}}", have.to_uuid()),
        }
        .into());
    }
    let loc = create::locator_for(child, new_parent, have)?;
    let rw = OpenOptions {
        ignore_linkage: true,
        ..Default::default()
    };
    let v = Vhdx::open_with_parent(child, &rw, parent)?;
    v.set_parent_locator(&loc)?;
    v.close()
}

/// Takes a checkpoint of the disk at `path`: a new differencing disk over it, at `child` or,
/// when `None`, next to it as `NAME_<GUID>.avhdx` (as Hyper-V names them). From then on
/// writes go to the child and `path` is its read-only parent. Returns the child's path.
/// Offline: whoever writes the disk must switch to the child.
pub fn checkpoint(path: &Path, child: Option<&Path>) -> Result<PathBuf> {
    let child = match child {
        Some(c) => c.to_path_buf(),
        None => {
            let stem = path
                .file_stem()
                .map(|s| s.to_string_lossy().to_string())
                .unwrap_or_else(|| "disk".into());
            let id = uuid::Uuid::new_v4().to_string().to_uppercase();
            path.with_file_name(format!("{stem}_{id}.avhdx"))
        }
    };
    if child.exists() {
        return Err(invalid(format!("{} already exists", child.display())));
    }
    // Made under a temporary name in the same folder (so the locator's relative path is the
    // same) and renamed when complete: a crash leaves no half-made child.
    let name = child
        .file_name()
        .ok_or_else(|| invalid(format!("{} names no file", child.display())))?;
    let tmp = child.with_file_name(format!(".{}.partial", name.to_string_lossy()));
    let _ = std::fs::remove_file(&tmp);
    let made = Vhdx::create(&tmp, &CreateOptions::differencing(path)).and_then(|c| c.close());
    if let Err(e) = made {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    std::fs::rename(&tmp, &child).map_err(|e| {
        Error::io(
            format!("cannot rename {} to {}", tmp.display(), child.display()),
            e,
        )
    })?;
    if let Some(dir) = child.parent().filter(|d| !d.as_os_str().is_empty()) {
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(child)
}

/// Copies the disk at `src` (its whole chain, flattened) into a new independent image at
/// `dst`, keeping zero regions unallocated.
pub fn clone(src: &Path, dst: &Path, opts: &ConvertOptions, job: &Job) -> Result<ConvertReport> {
    let v = Vhdx::open(src, &OpenOptions::read_only())?;
    let map = |off: u64, len: u64| v.fills(off, len, None);
    convert::convert(&v, Some(&map), dst, opts, job)
}
