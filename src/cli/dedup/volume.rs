//! `vstor dedup create` and `vstor dedup volume ...`: inline dedup, a store of volumes for
//! running VMs (opened as `dedup:STORE/NAME` by every command, the VMM and the daemon).

use super::{de, json_out};
use crate::cli::size_arg;
use clap::{Args, Subcommand};
use serde::Serialize;
use std::path::PathBuf;
use std::sync::Arc;
use vstor::{format_size, Error};
use vstor_dedup::vfs::RealFs;
use vstor_dedup::VolumeStore;

#[derive(Debug, Args)]
pub struct CreateArgs {
    /// The store's directory (new or empty).
    store: PathBuf,
}

#[derive(Debug, Subcommand)]
pub enum VolumeCommand {
    /// Make a volume of SIZE bytes that reads as zeroes (a multiple of 4 KiB).
    #[command(
        after_help = "Example:\n  vstor dedup volume create /srv/vols gold --size 20G\n  \
        vstor disk write dedup:/srv/vols/gold --input debian.raw"
    )]
    Create(VolumeCreateArgs),
    /// List the volumes of a store: size, blocks that hold data (own and shared with the
    /// volume it was cloned from), and what the store holds.
    #[command(after_help = "Example:\n  vstor dedup volume list /srv/vols --json")]
    List(ListArgs),
    /// Make NEW an instant clone of GOLD: it shares every block with GOLD until one of them
    /// writes it (a pool of VDI desktops from one golden image). GOLD must not be open.
    #[command(
        after_help = "Example:\n  vstor dedup volume clone /srv/vols gold vm1\n  \
        vstor serve --nbd unix:/run/vm1.sock --export vm1=dedup:/srv/vols/vm1"
    )]
    Clone(CloneArgs),
    /// Delete a volume: its blocks' references are dropped.
    #[command(after_help = "Example:\n  vstor dedup volume delete /srv/vols vm1")]
    Delete(DeleteArgs),
}

#[derive(Debug, Args)]
pub struct VolumeCreateArgs {
    /// The store's directory.
    store: PathBuf,
    /// The volume's name (letters, digits, '.', '_', '-').
    name: String,
    /// Its size (e.g. 20G; a multiple of 4 KiB, at most 64T).
    #[arg(long, value_parser = size_arg)]
    size: u64,
}

#[derive(Debug, Args)]
pub struct ListArgs {
    /// The store's directory.
    store: PathBuf,
    /// Report as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
pub struct CloneArgs {
    /// The store's directory.
    store: PathBuf,
    /// The volume to clone.
    gold: String,
    /// The clone's name.
    new: String,
}

#[derive(Debug, Args)]
pub struct DeleteArgs {
    /// The store's directory.
    store: PathBuf,
    /// The volume to delete.
    name: String,
}

fn open(store: &std::path::Path) -> Result<Arc<VolumeStore>, Error> {
    VolumeStore::shared(store).map_err(de)
}

/// `vstor dedup create STORE`.
pub fn create(a: CreateArgs) -> Result<(), Error> {
    VolumeStore::create(Arc::new(RealFs), &a.store).map_err(de)?;
    println!(
        "{} is a dedup store of volumes now (add one with vstor dedup volume create {} NAME \
         --size SIZE)",
        a.store.display(),
        a.store.display()
    );
    Ok(())
}

/// Runs a `vstor dedup volume` command.
pub fn run(c: VolumeCommand) -> Result<(), Error> {
    match c {
        VolumeCommand::Create(a) => {
            open(&a.store)?.create_volume(&a.name, a.size).map_err(de)?;
            println!(
                "created volume {} ({}): dedup:{}/{}",
                a.name,
                format_size(a.size),
                a.store.display(),
                a.name
            );
            Ok(())
        }
        VolumeCommand::List(a) => list(a),
        VolumeCommand::Clone(a) => {
            open(&a.store)?.clone_volume(&a.gold, &a.new).map_err(de)?;
            println!(
                "{} is a clone of {}: dedup:{}/{}",
                a.new,
                a.gold,
                a.store.display(),
                a.new
            );
            Ok(())
        }
        VolumeCommand::Delete(a) => {
            open(&a.store)?.delete_volume(&a.name).map_err(de)?;
            println!("deleted volume {}", a.name);
            Ok(())
        }
    }
}

fn list(a: ListArgs) -> Result<(), Error> {
    let vs = open(&a.store)?;
    let vols = vs.list().map_err(de)?;
    let st = vs.store().stats().map_err(de)?;
    #[derive(Serialize)]
    struct Vol {
        name: String,
        size: u64,
        mapped_bytes: u64,
        written_bytes: u64,
        shared_bytes: u64,
        origin: Option<String>,
        target: String,
    }
    #[derive(Serialize)]
    struct Out {
        store: String,
        volumes: Vec<Vol>,
        mapped_bytes: u64,
        chunks: u64,
        chunk_bytes: u64,
        stored_bytes: u64,
        ratio: f64,
    }
    let mapped: u64 = vols.iter().map(|v| v.mapped).sum();
    let out = Out {
        store: a.store.display().to_string(),
        volumes: vols
            .into_iter()
            .map(|v| Vol {
                target: format!("dedup:{}/{}", a.store.display(), v.name),
                shared_bytes: v.mapped - v.written,
                name: v.name,
                size: v.size,
                mapped_bytes: v.mapped,
                written_bytes: v.written,
                origin: (!v.origin.is_empty()).then_some(v.origin),
            })
            .collect(),
        mapped_bytes: mapped,
        chunks: st.chunks,
        chunk_bytes: st.chunk_bytes,
        stored_bytes: st.stored_bytes,
        ratio: if st.stored_bytes > 0 {
            mapped as f64 / st.stored_bytes as f64
        } else {
            0.0
        },
    };
    if a.json {
        return json_out(&out);
    }
    println!(
        "{:<24} {:>10} {:>10} {:>10}  ORIGIN",
        "NAME", "SIZE", "DATA", "WRITTEN"
    );
    for v in &out.volumes {
        println!(
            "{:<24} {:>10} {:>10} {:>10}  {}",
            v.name,
            format_size(v.size),
            format_size(v.mapped_bytes),
            format_size(v.written_bytes),
            v.origin.as_deref().unwrap_or("-")
        );
    }
    println!(
        "{} volumes, {} of data in {} stored ({} unique blocks; ratio {:.2}:1)",
        out.volumes.len(),
        format_size(out.mapped_bytes),
        format_size(out.stored_bytes),
        out.chunks,
        out.ratio
    );
    Ok(())
}
