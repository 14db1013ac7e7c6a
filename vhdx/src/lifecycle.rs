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
pub fn merge(child: &Path, into: Option<&Path>, job: &Job) -> Result<MergeReport> {
    let top = Arc::new(Vhdx::open(child, &OpenOptions::read_only())?);
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
    for p in &removed {
        std::fs::remove_file(p)
            .map_err(|e| Error::io(format!("merged, but cannot remove {}", p.display()), e))?;
    }
    target.set_merge_marker(None)?;
    target.close()?;
    drop(target);
    Ok(MergeReport {
        into: target_path,
        removed,
        copied_bytes: copied,
        size,
    })
}

/// The device-level merge: writes what `top` and the disks down to `depth - 1` hold into
/// `target` (the ancestor `depth` levels below `top`, opened writable on its own), marked so
/// that `top` stays openable until the caller has removed the merged disks and cleared the
/// marker (`target.set_merge_marker(None)`). Returns the bytes copied.
pub fn merge_into(top: &Vhdx, depth: usize, target: &Vhdx, job: &Job) -> Result<u64> {
    let mut above: &Vhdx = top;
    for _ in 1..depth {
        above = above
            .parent()
            .ok_or_else(|| invalid("the chain is shorter than the merge depth"))?;
    }
    // The marker keeps the disk above the target openable (as it was) until the merge is
    // done: an interrupted merge leaves the old disk readable and can be run again.
    let linkage = above
        .metadata()
        .parent
        .as_ref()
        .and_then(|l| l.get("parent_linkage"))
        .and_then(|s| uuid::Uuid::parse_str(s.trim_matches(|c| c == '{' || c == '}')).ok())
        .map(Guid::from_uuid)
        .ok_or_else(|| invalid("the disk above the target records no parent linkage"))?;
    if target.merge_marker() != Some(linkage) {
        target.set_merge_marker(Some(linkage))?;
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
