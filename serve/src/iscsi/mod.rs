//! The iSCSI target (RFC 7143): every export of the registry is a target with one LUN (0),
//! served by the SCSI core ([`crate::scsi::Lun`]).
//!
//! **Names.** An export `NAME` is the target `iqn.2026-12.io.vstor:name` (the export name in
//! lower case, `_` as `-`: iSCSI names compare case-insensitively and hold no `_`), unless its options name another
//! ([`TargetOpts::iqn`]). The target portal group tag is 1.
//!
//! **Who may log in.** [`TargetOpts::initiators`] lists the initiator names allowed (an
//! empty list allows every initiator); a login from another is refused with "authorization
//! failure" (status 0x0202), and a discovery session does not list the target to it. An export
//! that is not shared ([`TargetOpts::shared`] false) admits one initiator name at a time: while
//! an initiator has a session, another initiator's login is refused with "service unavailable"
//! (0x0301, a target error: the initiator may retry later); `shared=on` admits several
//! initiators at once, which arbitrate with SCSI-3 persistent reservations. Either way, one
//! owner process holds the disk: every initiator's commands go through the same stack.
//!
//! **Authentication.** Without CHAP credentials ([`chap::ChapConfig`]) logins use
//! `AuthMethod=None`; with them every login (discovery too) must pass CHAP (MD5), and an
//! initiator that challenges the target back gets mutual CHAP when the credentials name the
//! target's own secret.
//!
//! **Sessions.** Login negotiates HeaderDigest and DataDigest (CRC32C or None),
//! MaxRecvDataSegmentLength (this target declares 256 KiB), MaxBurstLength,
//! FirstBurstLength, ImmediateData, InitialR2T; MaxConnections, MaxOutstandingR2T and
//! ErrorRecoveryLevel are held to 1, 1 and 0; DataPDUInOrder and DataSequenceInOrder to Yes.
//! Several sessions per target and several initiators at once; a login with the ISID of a
//! live session of the same initiator and target replaces it (session reinstatement).
//!
//! **Commands.** SCSI commands with immediate data, unsolicited Data-Out (InitialR2T=No) and
//! R2T-solicited Data-Out, one R2T outstanding per command; Data-In in PDUs of the initiator's
//! MaxRecvDataSegmentLength, bursts of MaxBurstLength, with the status in the last Data-In
//! PDU when it is GOOD (phase collapse). NOP-Out pings are answered; Text requests answer
//! `SendTargets`; task management: ABORT TASK, ABORT TASK SET, CLEAR TASK SET, LOGICAL UNIT
//! RESET and TARGET WARM/COLD RESET abort the tasks they name (no response is sent for an
//! aborted task); the resets give every nexus a reset unit attention (reservations stay) and a
//! cold reset closes the target's connections; CLEAR ACA answers "function not supported",
//! TASK REASSIGN "task reassignment not supported". Logout waits for
//! the session's commands to be answered.
//!
//! **Errors.** A header digest error, or a data segment longer than this target's
//! MaxRecvDataSegmentLength, ends the connection (at error recovery level 0 nothing after it
//! can be trusted). A data digest error is rejected (reason 0x02); a Data-Out whose offset,
//! DataSN or length does not match its R2T (or the unsolicited burst) is rejected (0x09) and its
//! command ends with CHECK CONDITION, ABORTED COMMAND (ASC 0x4B: DATA OFFSET ERROR or TOO
//! MUCH WRITE DATA; 0x47/0x05 for a digest error); a Data-Out of no known task is rejected; an
//! unknown opcode is rejected (0x05); a malformed command PDU (bad AHS, immediate data it may
//! not carry) is rejected (0x04/0x09), which ends that command. Other sessions are not touched.
//!
//! **Reservations** persist beside the disk: the LUN's state file is the target's first file
//! with `.vstor-pr` appended (`/srv/d0.vhdx.vstor-pr`; for `pool:DIR/NAME`, `DIR/NAME.vstor-pr`).
//! A PREEMPT AND ABORT drops the victim's commands queued here or waiting for their Data-Out.
//! An online resize reaches initiators as a CAPACITY DATA HAS CHANGED unit attention.

pub mod chap;
pub mod pdu;
mod target;
pub mod text;

pub use target::IscsiServer;

use std::path::PathBuf;
use std::time::Duration;

/// The prefix of default target names.
pub const IQN_PREFIX: &str = "iqn.2026-12.io.vstor:";

/// The target portal group tag of every portal.
pub const TPGT: u16 = 1;

/// iSCSI options of one export (`--export NAME=TARGET,shared=on,iqn=...,initiators=A+B`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TargetOpts {
    /// The target name (default: [`default_iqn`]).
    pub iqn: Option<String>,
    /// Several initiators at once.
    pub shared: bool,
    /// The initiator names allowed (empty: all).
    pub initiators: Vec<String>,
}

/// The iSCSI target's settings.
#[derive(Clone, Debug)]
pub struct IscsiConfig {
    /// Worker threads per session (each runs one command at a time).
    pub workers: usize,
    /// The most connections at once (beyond, new ones are closed at once).
    pub max_connections: usize,
    /// A connection that has not finished its login in this time is closed.
    pub login_timeout: Duration,
    /// CHAP credentials; without, logins use AuthMethod=None.
    pub chap: Option<chap::ChapConfig>,
}

impl Default for IscsiConfig {
    fn default() -> Self {
        IscsiConfig {
            workers: 8,
            max_connections: 256,
            login_timeout: Duration::from_secs(15),
            chap: None,
        }
    }
}

/// The default target name of export `name`: the name in lower case, with `_` (which iSCSI
/// names may not hold) as `-`.
pub fn default_iqn(name: &str) -> String {
    format!(
        "{IQN_PREFIX}{}",
        name.to_ascii_lowercase().replace('_', "-")
    )
}

/// Checks an iSCSI name (`iqn.`, `eui.` or `naa.` form, at most 223 bytes, no spaces).
pub fn check_name(s: &str) -> Result<(), String> {
    let lower = s.to_ascii_lowercase();
    let ok = s.len() <= 223
        && (lower.starts_with("iqn.") || lower.starts_with("eui.") || lower.starts_with("naa."))
        && s.len() > 4
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-.:".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "'{}' is not an iSCSI name (iqn.YYYY-MM.reversed.domain[:id], eui. or naa.; \
             letters, digits, '-', '.', ':')",
            s.escape_debug()
        ))
    }
}

impl TargetOpts {
    /// Takes the iSCSI options out of a target string's options (`shared=on|off`,
    /// `iqn=NAME`, `initiators=NAME+NAME`), returning them and the target string without
    /// them. Commas doubled (`,,`) belong to the path.
    pub fn split_from(target: &str) -> Result<(TargetOpts, String), String> {
        let mut parts: Vec<String> = Vec::new();
        let mut cur = String::new();
        let b: Vec<char> = target.chars().collect();
        let mut i = 0;
        while i < b.len() {
            if b[i] == ',' {
                if b.get(i + 1) == Some(&',') {
                    cur.push_str(",,");
                    i += 2;
                    continue;
                }
                parts.push(std::mem::take(&mut cur));
            } else {
                cur.push(b[i]);
            }
            i += 1;
        }
        parts.push(cur);
        let mut o = TargetOpts::default();
        let mut kept = vec![parts[0].clone()];
        for p in &parts[1..] {
            match p.split_once('=') {
                Some(("shared", v)) => {
                    o.shared = match v {
                        "on" | "yes" | "true" => true,
                        "off" | "no" | "false" => false,
                        _ => return Err(format!("shared={v}: use on or off")),
                    }
                }
                Some(("iqn", v)) => {
                    check_name(v)?;
                    o.iqn = Some(v.to_string());
                }
                Some(("initiators", v)) => {
                    for n in v.split('+') {
                        check_name(n)?;
                        o.initiators.push(n.to_string());
                    }
                }
                _ => kept.push(p.clone()),
            }
        }
        Ok((o, kept.join(",")))
    }
}

/// Where the reservations of an export opened from `target` persist: its first file with
/// [`PR_STATE_SUFFIX`](crate::export::PR_STATE_SUFFIX) appended (see
/// [`sidecar_path`](crate::export::sidecar_path)). None when the target names no file here (a
/// target of another kind, or a file that does not exist): its reservations are kept in
/// memory only.
pub fn pr_state_path(target: &str) -> Option<PathBuf> {
    crate::export::sidecar_path(target, crate::export::PR_STATE_SUFFIX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_split_from_the_target() {
        let (o, t) = TargetOpts::split_from(
            "/srv/a,,b.vhdx,readonly=on,shared=on,iqn=iqn.2000-01.x:y,initiators=iqn.1994-05.a:1+iqn.1994-05.b:2",
        )
        .unwrap();
        assert_eq!(t, "/srv/a,,b.vhdx,readonly=on");
        assert!(o.shared);
        assert_eq!(o.iqn.as_deref(), Some("iqn.2000-01.x:y"));
        assert_eq!(o.initiators.len(), 2);
        assert!(TargetOpts::split_from("/a,shared=maybe").is_err());
        assert!(TargetOpts::split_from("/a,iqn=bad name").is_err());
        let (o, t) = TargetOpts::split_from("raw:/x.img").unwrap();
        assert_eq!((o, t.as_str()), (TargetOpts::default(), "raw:/x.img"));
    }

    #[test]
    fn pr_state_beside_the_first_file() {
        let dir = std::env::temp_dir().join(format!("vstor-pr-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let d = dir.join("a,b.img");
        std::fs::write(&d, b"").unwrap();
        let ds = d.display().to_string();
        assert_eq!(
            pr_state_path(&format!("raw:{},readonly=on", ds.replace(',', ",,"))),
            Some(PathBuf::from(format!("{ds}.vstor-pr")))
        );
        assert_eq!(
            pr_state_path(&ds.replace(',', ",,")),
            Some(PathBuf::from(format!("{ds}.vstor-pr")))
        );
        let space = dir.join("space1").display().to_string();
        assert_eq!(
            pr_state_path(&format!("pool:{space}")),
            Some(PathBuf::from(format!("{space}.vstor-pr")))
        );
        assert_eq!(pr_state_path("mem:1048576"), None);
        assert_eq!(pr_state_path("/no/such/file.img"), None);
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(default_iqn("Disk0"), "iqn.2026-12.io.vstor:disk0");
    }
}
