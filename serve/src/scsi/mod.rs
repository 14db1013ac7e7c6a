//! The SCSI target core: one export as a SAN array's logical unit (SPC-4 primary commands,
//! SBC-3/4 block commands) with SPC-4 persistent reservations.
//!
//! A transport (iSCSI, in `crate::iscsi`) turns its PDUs into calls of [`Lun::execute`] with the
//! I_T nexus the command came on ([`Nexus`]), the CDB and the Data-Out bytes, and sends back
//! the [`ScsiResponse`]: status, fixed-format sense data, Data-In (already cut to the CDB's
//! allocation length). [`Lun::data_dir`] tells it, from the CDB alone, which way data moves and
//! how much Data-Out to collect before executing.
//!
//! **Interface additions** beyond the agreed API (serve/src/scsi_api.md of issue 19):
//! - [`Lun::data_dir_of`]: the same as [`Lun::data_dir`] with this LUN's logical block size
//!   (`data_dir` takes 512-byte blocks: a WRITE's Data-Out length is its block count times the
//!   block size, which a CDB alone does not say);
//! - [`Lun::reset`]: the transport reports a LOGICAL UNIT RESET (or target reset) task
//!   management function, for the reset unit attention every nexus must see;
//! - [`Lun::execute_batch`]: several commands of one nexus at once, their READs and WRITEs
//!   submitted to the stack as one batch (what a transport that drains every command received
//!   on a connection hands over);
//! - [`sense::TASK_ABORTED`]: the status of a command that a PREEMPT AND ABORT of another nexus
//!   aborted while it waited to run; the transport sends no response for it (TAS=0).
//!
//! **Persistent reservations** (SPC-4 5.13): registrations per I_T nexus (or
//! per initiator port on all target ports, ALL_TG_PT), the six reservation types enforced on
//! every command of every nexus (reads are allowed under the write-exclusive types, TEST UNIT
//! READY, INQUIRY, REPORT LUNS, REQUEST SENSE, READ CAPACITY and PERSISTENT RESERVE IN/OUT
//! under all; SYNCHRONIZE CACHE counts as a write, MODE SENSE as a read). SPEC_I_PT is
//! refused (REPORT CAPABILITIES says SIP_C=0); REPLACE LOST RESERVATION is not offered. The
//! state is written (two CRC-32C slots, alternately, flushed) before the PERSISTENT RESERVE
//! OUT that changed it completes, whatever APTPL says: a daemon restart is not a power loss of
//! the unit, so registrations and the reservation survive it; APTPL is kept and reported
//! (PTPL_A). A write that fails fails the command and leaves the state as it was.
//!
//! **Fencing.** Commands that touch the medium hold the reservation state shared from their
//! access check through their I/O; PERSISTENT RESERVE OUT holds it exclusively. A PREEMPT AND
//! ABORT therefore completes only after the victim's commands that passed their check have
//! finished; the victim's commands that were waiting return [`sense::TASK_ABORTED`]; queued
//! ones the transport drops through its abort hook ([`Lun::set_abort_hook`]); later ones meet
//! the new reservation. No write of a fenced nexus lands after the preempt completes.
//!
//! **Unit attentions.** The first command of every new I_T nexus finds POWER ON, RESET OR BUS
//! DEVICE RESET OCCURRED; capacity changes, and the reservation changes SPC-4 names, queue
//! theirs. INQUIRY, REPORT LUNS and REQUEST SENSE never report one (REQUEST SENSE returns and
//! clears it as its sense data); any other command reports and clears the oldest one.

mod pr;
pub mod sense;
mod store;

use crate::export::{Export, ServeError};
use sense::{asc, key, CHECK_CONDITION, GOOD};
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use vstor_core::{BlockDevice, ErrorKind, FileDevice, FileOptions, ListenerId, OpKind, Request};

/// Bytes a device given to [`Lun::with_pr_device`] needs.
pub const PR_STORE_BYTES: u64 = store::STORE_BYTES;

/// An I_T nexus. `initiator` is the initiator port's TransportID name
/// (iSCSI: "<initiator iqn>,i,0x<ISID as 12 hex digits>"), `target` the target port's name
/// ("<target iqn>,t,0x<TPGT as 4 hex digits>").
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Nexus {
    /// The initiator port's name.
    pub initiator: String,
    /// The target port's name.
    pub target: String,
}

/// What a command moves, decided from its CDB alone.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DataDir {
    /// No data.
    None,
    /// Data-In (the response's `data`).
    In,
    /// Data-Out of this many bytes.
    Out(u32),
}

/// One command of a batch ([`Lun::execute_batch`]): its CDB and all the Data-Out the
/// initiator sent for it (as [`Lun::execute`] takes them).
#[derive(Clone, Copy, Debug)]
pub struct Command<'a> {
    /// The CDB.
    pub cdb: &'a [u8],
    /// The Data-Out.
    pub data_out: &'a [u8],
}

/// The outcome of one command.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScsiResponse {
    /// GOOD 0x00, CHECK CONDITION 0x02, BUSY 0x08, RESERVATION CONFLICT 0x18, TASK ABORTED 0x40.
    pub status: u8,
    /// Fixed-format sense data (0x70...), empty unless CHECK CONDITION (or GOOD from REQUEST
    /// SENSE, whose sense data is its Data-In).
    pub sense: Vec<u8>,
    /// Data-In, already cut to the CDB's allocation length.
    pub data: Vec<u8>,
}

impl ScsiResponse {
    /// GOOD with `data`.
    pub fn good(data: Vec<u8>) -> Self {
        ScsiResponse {
            status: GOOD,
            sense: Vec::new(),
            data,
        }
    }

    /// CHECK CONDITION with `sense`.
    pub fn check(sense: Vec<u8>) -> Self {
        ScsiResponse {
            status: CHECK_CONDITION,
            sense,
            data: Vec::new(),
        }
    }

    /// CHECK CONDITION with `key` and `code`.
    pub fn sense(key: u8, code: (u8, u8)) -> Self {
        Self::check(sense::fixed(key, code))
    }

    /// RESERVATION CONFLICT.
    pub fn conflict() -> Self {
        ScsiResponse {
            status: sense::RESERVATION_CONFLICT,
            sense: Vec::new(),
            data: Vec::new(),
        }
    }

    /// The sense key, ASC and ASCQ of a CHECK CONDITION (None otherwise).
    pub fn sense_code(&self) -> Option<(u8, u8, u8)> {
        (self.sense.len() >= 14).then(|| (self.sense[2] & 0x0f, self.sense[12], self.sense[13]))
    }
}

/// ILLEGAL REQUEST, INVALID FIELD IN CDB, pointing at byte `byte`.
fn invalid_cdb(byte: u16) -> ScsiResponse {
    ScsiResponse::check(sense::with_field_pointer(
        key::ILLEGAL_REQUEST,
        asc::INVALID_FIELD_IN_CDB,
        true,
        byte,
        None,
    ))
}

/// ILLEGAL REQUEST, INVALID FIELD IN PARAMETER LIST, pointing at byte `byte`.
fn invalid_param(byte: u16) -> ScsiResponse {
    ScsiResponse::check(sense::with_field_pointer(
        key::ILLEGAL_REQUEST,
        asc::INVALID_FIELD_IN_PARAMETER_LIST,
        false,
        byte,
        None,
    ))
}

fn invalid_opcode() -> ScsiResponse {
    ScsiResponse::sense(key::ILLEGAL_REQUEST, asc::INVALID_OPCODE)
}

fn lba_out_of_range() -> ScsiResponse {
    ScsiResponse::sense(key::ILLEGAL_REQUEST, asc::LBA_OUT_OF_RANGE)
}

fn write_protected() -> ScsiResponse {
    ScsiResponse::sense(key::DATA_PROTECT, asc::WRITE_PROTECTED)
}

/// The sense for an error of the stack during a read (`write` false) or a write.
fn stack_error(e: &vstor_core::Error, write: bool) -> ScsiResponse {
    match e.kind() {
        ErrorKind::ReadOnly => write_protected(),
        ErrorKind::NoSpace => ScsiResponse::sense(key::DATA_PROTECT, asc::SPACE_ALLOCATION_FAILED),
        ErrorKind::OutOfRange => lba_out_of_range(),
        ErrorKind::Unavailable => ScsiResponse::sense(key::NOT_READY, asc::NOT_READY),
        ErrorKind::Cancelled => ScsiResponse::sense(key::ABORTED_COMMAND, asc::NONE),
        ErrorKind::InvalidInput | ErrorKind::Unsupported => {
            ScsiResponse::sense(key::HARDWARE_ERROR, asc::INTERNAL_TARGET_FAILURE)
        }
        _ if write => ScsiResponse::sense(key::MEDIUM_ERROR, asc::WRITE_ERROR),
        _ => ScsiResponse::sense(key::MEDIUM_ERROR, asc::READ_ERROR),
    }
}

/// How a LUN describes itself.
#[derive(Clone, Debug)]
pub struct LunConfig {
    /// VPD 0x80 unit serial number (printable ASCII).
    pub serial: String,
    /// VPD 0x83 NAA identifier (8 bytes: NAA 5, IEEE registered; a value whose top nibble is
    /// not a valid 8-byte NAA type gets NAA 5).
    pub naa: u64,
    /// Where reservations persist (None: in memory only).
    pub pr_state: Option<std::path::PathBuf>,
    /// T10 vendor identification (8 characters, padded or cut).
    pub vendor: String,
    /// Product identification (16 characters, padded or cut).
    pub product: String,
}

/// Operation codes.
pub mod op {
    /// TEST UNIT READY.
    pub const TEST_UNIT_READY: u8 = 0x00;
    /// REQUEST SENSE.
    pub const REQUEST_SENSE: u8 = 0x03;
    /// READ (6).
    pub const READ_6: u8 = 0x08;
    /// WRITE (6).
    pub const WRITE_6: u8 = 0x0a;
    /// INQUIRY.
    pub const INQUIRY: u8 = 0x12;
    /// MODE SENSE (6).
    pub const MODE_SENSE_6: u8 = 0x1a;
    /// READ CAPACITY (10).
    pub const READ_CAPACITY_10: u8 = 0x25;
    /// READ (10).
    pub const READ_10: u8 = 0x28;
    /// WRITE (10).
    pub const WRITE_10: u8 = 0x2a;
    /// PRE-FETCH (10).
    pub const PRE_FETCH_10: u8 = 0x34;
    /// SYNCHRONIZE CACHE (10).
    pub const SYNCHRONIZE_CACHE_10: u8 = 0x35;
    /// PRE-FETCH (16).
    pub const PRE_FETCH_16: u8 = 0x90;
    /// WRITE SAME (10).
    pub const WRITE_SAME_10: u8 = 0x41;
    /// UNMAP.
    pub const UNMAP: u8 = 0x42;
    /// MODE SENSE (10).
    pub const MODE_SENSE_10: u8 = 0x5a;
    /// PERSISTENT RESERVE IN.
    pub const PERSISTENT_RESERVE_IN: u8 = 0x5e;
    /// PERSISTENT RESERVE OUT.
    pub const PERSISTENT_RESERVE_OUT: u8 = 0x5f;
    /// READ (16).
    pub const READ_16: u8 = 0x88;
    /// COMPARE AND WRITE.
    pub const COMPARE_AND_WRITE: u8 = 0x89;
    /// WRITE (16).
    pub const WRITE_16: u8 = 0x8a;
    /// SYNCHRONIZE CACHE (16).
    pub const SYNCHRONIZE_CACHE_16: u8 = 0x91;
    /// WRITE SAME (16).
    pub const WRITE_SAME_16: u8 = 0x93;
    /// SERVICE ACTION IN (16): READ CAPACITY (16) 0x10, GET LBA STATUS 0x12.
    pub const SERVICE_ACTION_IN_16: u8 = 0x9e;
    /// REPORT LUNS.
    pub const REPORT_LUNS: u8 = 0xa0;
    /// MAINTENANCE IN: REPORT SUPPORTED OPERATION CODES 0x0C.
    pub const MAINTENANCE_IN: u8 = 0xa3;
    /// READ (12).
    pub const READ_12: u8 = 0xa8;
    /// WRITE AND VERIFY (10).
    pub const WRITE_AND_VERIFY_10: u8 = 0x2e;
    /// VERIFY (10).
    pub const VERIFY_10: u8 = 0x2f;
    /// WRITE AND VERIFY (16).
    pub const WRITE_AND_VERIFY_16: u8 = 0x8e;
    /// VERIFY (16).
    pub const VERIFY_16: u8 = 0x8f;
    /// WRITE AND VERIFY (12).
    pub const WRITE_AND_VERIFY_12: u8 = 0xae;
    /// VERIFY (12).
    pub const VERIFY_12: u8 = 0xaf;
    /// WRITE (12).
    pub const WRITE_12: u8 = 0xaa;
}

/// SERVICE ACTION IN (16) service actions.
const SA_READ_CAPACITY_16: u8 = 0x10;
const SA_GET_LBA_STATUS: u8 = 0x12;

/// The most bytes one READ or WRITE moves (VPD 0xB0 MAXIMUM TRANSFER LENGTH).
pub const MAX_TRANSFER_BYTES: u32 = 32 << 20;
/// The most blocks one COMPARE AND WRITE compares (VPD 0xB0).
pub const MAX_COMPARE_AND_WRITE_BLOCKS: u8 = 128;
/// The most blocks one UNMAP descriptor covers (VPD 0xB0 MAXIMUM UNMAP LBA COUNT).
pub const MAX_UNMAP_BLOCKS: u32 = 1 << 20;
/// The most blocks one WRITE SAME covers (VPD 0xB0 MAXIMUM WRITE SAME LENGTH).
pub const MAX_WRITE_SAME_BLOCKS: u32 = 1 << 20;
/// The fewest blocks the transfer limit allows, whatever the block size.
const MIN_TRANSFER_BLOCKS: u32 = 65536;

/// The most blocks one READ or WRITE moves with `bs`-byte blocks.
fn max_transfer_blocks(bs: u32) -> u32 {
    (MAX_TRANSFER_BYTES / bs.max(1)).max(MIN_TRANSFER_BLOCKS)
}
/// The most descriptors one UNMAP carries.
pub const MAX_UNMAP_DESCRIPTORS: u32 = 256;
/// The largest chunk a WRITE SAME writes at once (a repeated block pattern).
const WRITE_SAME_CHUNK: usize = 1 << 20;

fn be16(b: &[u8], i: usize) -> u16 {
    u16::from_be_bytes([b[i], b[i + 1]])
}
fn be32(b: &[u8], i: usize) -> u32 {
    u32::from_be_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]])
}
fn be64(b: &[u8], i: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[i..i + 8]);
    u64::from_be_bytes(a)
}

/// The CDB length an operation code's group implies (None: vendor specific or variable).
fn cdb_len(opcode: u8) -> Option<usize> {
    match opcode >> 5 {
        0 => Some(6),
        1 | 2 => Some(10),
        4 => Some(16),
        5 => Some(12),
        _ => None,
    }
}

/// A unit attention condition.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Ua {
    PowerOnReset,
    LunReset,
    CapacityChanged,
    ReservationsPreempted,
    ReservationsReleased,
    RegistrationsPreempted,
}

impl Ua {
    fn code(self) -> (u8, u8) {
        match self {
            Ua::PowerOnReset => asc::POWER_ON_RESET,
            Ua::LunReset => asc::BUS_DEVICE_RESET,
            Ua::CapacityChanged => asc::CAPACITY_CHANGED,
            Ua::ReservationsPreempted => asc::RESERVATIONS_PREEMPTED,
            Ua::ReservationsReleased => asc::RESERVATIONS_RELEASED,
            Ua::RegistrationsPreempted => asc::REGISTRATIONS_PREEMPTED,
        }
    }
}

/// What the LUN keeps per I_T nexus.
#[derive(Default)]
struct NexusState {
    ua: VecDeque<Ua>,
}

impl NexusState {
    fn push(&mut self, ua: Ua) {
        let reset = |u: &Ua| matches!(u, Ua::PowerOnReset | Ua::LunReset);
        if self.ua.iter().any(reset) || self.ua.contains(&ua) {
            return; // a reset already covers every other change
        }
        if reset(&ua) {
            self.ua.clear();
        }
        self.ua.push_back(ua);
    }
}

/// One logical unit: an export served as a SCSI block device.
pub struct Lun {
    export: Arc<Export>,
    config: LunConfig,
    nexuses: Mutex<HashMap<Nexus, NexusState>>,
    /// Writes hold it shared, COMPARE AND WRITE exclusively: its read, compare and write are
    /// atomic against every other write of this LUN.
    write_order: RwLock<()>,
    /// The capacity listener on the stack's capacity signal, if it has one.
    listener: Mutex<Option<ListenerId>>,
    /// The reservation state. Every command that reads or writes the medium holds it shared
    /// from its access check through its I/O; PERSISTENT RESERVE OUT holds it exclusively, so
    /// when a PREEMPT (AND ABORT) completes no command of the preempted nexus that passed its
    /// check before is still running.
    pr: RwLock<pr::PrState>,
    /// Where the reservation state is written (None: memory only). Used under `pr`'s write lock.
    store: Mutex<Option<store::Store>>,
    /// Counts PREEMPT AND ABORTs; a command that sees it change while it waits for `pr` looks
    /// in `aborted` for its nexus.
    abort_epoch: AtomicU64,
    aborted: Mutex<VecDeque<(u64, Nexus)>>,
    abort_hook: Mutex<Option<AbortHook>>,
}

/// What [`Lun::set_abort_hook`] takes: aborts the queued tasks of the nexuses given.
pub type AbortFn = dyn Fn(&[Nexus]) + Send + Sync;
type AbortHook = Arc<AbortFn>;

/// How many aborted nexuses the LUN remembers for commands that were waiting.
const ABORTED_KEPT: usize = 256;

impl std::fmt::Debug for Lun {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lun")
            .field("export", &self.export.name())
            .field("serial", &self.config.serial)
            .finish_non_exhaustive()
    }
}

impl Drop for Lun {
    fn drop(&mut self) {
        let id = self
            .listener
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let (Some(id), Some(sig)) = (id, self.export.device().capacity_signal()) {
            sig.unsubscribe(id);
        }
    }
}

/// Whether a command is refused by a read-only export: the ones that change the medium.
fn is_medium_write(opcode: u8) -> bool {
    matches!(
        opcode,
        op::WRITE_6
            | op::WRITE_10
            | op::WRITE_12
            | op::WRITE_16
            | op::WRITE_SAME_10
            | op::WRITE_SAME_16
            | op::UNMAP
            | op::COMPARE_AND_WRITE
            | op::WRITE_AND_VERIFY_10
            | op::WRITE_AND_VERIFY_12
            | op::WRITE_AND_VERIFY_16
    )
}

impl Lun {
    /// A logical unit serving `export`. With `config.pr_state`, the reservation state lives
    /// in that file (created when missing, locked while the LUN lives) and is read back.
    pub fn new(export: Arc<Export>, config: LunConfig) -> Result<Arc<Lun>, ServeError> {
        let dev: Option<Arc<dyn BlockDevice>> = match &config.pr_state {
            None => None,
            Some(path) => {
                let opts = FileOptions {
                    lock: true,
                    ..Default::default()
                };
                let f = if path.exists() {
                    FileDevice::open(path, &opts)?
                } else {
                    FileDevice::create(path, store::STORE_BYTES, &opts)?
                };
                Some(Arc::new(f))
            }
        };
        Self::build(export, config, dev)
    }

    /// A logical unit whose reservation state lives on `pr_device` (at least
    /// [`PR_STORE_BYTES`]), whatever `config.pr_state` says: a device of the stack's own, or a
    /// fault device in tests.
    pub fn with_pr_device(
        export: Arc<Export>,
        config: LunConfig,
        pr_device: Arc<dyn BlockDevice>,
    ) -> Result<Arc<Lun>, ServeError> {
        Self::build(export, config, Some(pr_device))
    }

    fn build(
        export: Arc<Export>,
        config: LunConfig,
        dev: Option<Arc<dyn BlockDevice>>,
    ) -> Result<Arc<Lun>, ServeError> {
        let (store, state) = match dev {
            None => (None, pr::PrState::default()),
            Some(dev) => {
                let (store, payload) = store::Store::open(dev)?;
                let state = match payload {
                    None => pr::PrState::default(),
                    Some(p) => pr::PrState::decode(&p).ok_or_else(|| {
                        ServeError::new(
                            ErrorKind::Corrupt,
                            "the persistent reservation state is malformed",
                        )
                    })?,
                };
                (Some(store), state)
            }
        };
        let lun = Arc::new(Lun {
            export,
            config,
            nexuses: Mutex::new(HashMap::new()),
            write_order: RwLock::new(()),
            listener: Mutex::new(None),
            pr: RwLock::new(state),
            store: Mutex::new(store),
            abort_epoch: AtomicU64::new(0),
            aborted: Mutex::new(VecDeque::new()),
            abort_hook: Mutex::new(None),
        });
        if let Some(sig) = lun.export.device().capacity_signal() {
            let weak: Weak<Lun> = Arc::downgrade(&lun);
            let id = sig.subscribe(move |_| {
                if let Some(l) = weak.upgrade() {
                    l.capacity_changed();
                }
            });
            *lun.listener.lock().unwrap_or_else(|p| p.into_inner()) = Some(id);
        }
        Ok(lun)
    }

    /// The export this LUN serves.
    pub fn export(&self) -> &Arc<Export> {
        &self.export
    }

    fn device(&self) -> &Arc<dyn BlockDevice> {
        self.export.device()
    }

    fn block_size(&self) -> u32 {
        self.device().info().logical_sector_size.max(1)
    }

    /// Direction and Data-Out length of a CDB, for 512-byte logical blocks; Err(a CHECK
    /// CONDITION response) when malformed or unsupported. See [`Lun::data_dir_of`].
    pub fn data_dir(cdb: &[u8]) -> Result<DataDir, ScsiResponse> {
        data_dir_bs(cdb, 512)
    }

    /// Direction and Data-Out length of a CDB for this LUN's logical block size. On a
    /// read-only export a command that would change the medium is refused here already (DATA
    /// PROTECT, WRITE PROTECTED), so a transport need not collect its Data-Out, and a
    /// malformed transfer does not hide the write protection.
    pub fn data_dir_of(&self, cdb: &[u8]) -> Result<DataDir, ScsiResponse> {
        let dir = data_dir_bs(cdb, self.block_size())?;
        if cdb.first().is_some_and(|&o| is_medium_write(o)) && self.export.read_only() {
            return Err(write_protected());
        }
        Ok(dir)
    }

    /// The transport calls this when the export's size changed (a capacity-changed UA for
    /// all). The LUN also listens to the stack's capacity signal itself; a change reported
    /// twice queues one unit attention.
    pub fn capacity_changed(&self) {
        let mut n = self.nexuses.lock().unwrap_or_else(|p| p.into_inner());
        for s in n.values_mut() {
            s.push(Ua::CapacityChanged);
        }
    }

    /// A LOGICAL UNIT RESET (or a target reset) happened: every I_T nexus gets BUS DEVICE
    /// RESET FUNCTION OCCURRED. Aborting the tasks is the transport's part; reservations and
    /// registrations stay (SPC-4: they are persistent).
    pub fn reset(&self) {
        let mut n = self.nexuses.lock().unwrap_or_else(|p| p.into_inner());
        for s in n.values_mut() {
            s.push(Ua::LunReset);
        }
    }

    /// The transport registers how to abort every queued task of the given nexuses (PREEMPT
    /// AND ABORT): called before the PREEMPT AND ABORT completes, with the reservation state
    /// locked (the hook must not call back into this LUN, nor wait for commands inside
    /// [`Lun::execute`]); aborted tasks get no response (TAS=0). Commands of the victims
    /// already inside `execute` are finished before the PREEMPT AND ABORT completes (those
    /// that passed their checks) or return [`sense::TASK_ABORTED`] (those still waiting).
    pub fn set_abort_hook(&self, hook: Box<AbortFn>) {
        *self.abort_hook.lock().unwrap_or_else(|p| p.into_inner()) = Some(Arc::from(hook));
    }

    /// A session/connection ended (registrations stay, as SPC-4 says). The nexus's pending
    /// unit attentions go; its next command, on a new login, finds a reset.
    pub fn nexus_lost(&self, nexus: &Nexus) {
        self.nexuses
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(nexus);
    }

    /// Takes the unit attention `nexus` must be told about for a command with `opcode`, if
    /// any (a new nexus starts with a reset).
    fn take_ua(&self, nexus: &Nexus, opcode: u8) -> Option<Ua> {
        let mut n = self.nexuses.lock().unwrap_or_else(|p| p.into_inner());
        let s = match n.get_mut(nexus) {
            Some(s) => s,
            None => {
                let mut s = NexusState::default();
                s.push(Ua::PowerOnReset);
                n.entry(nexus.clone()).or_insert(s)
            }
        };
        if s.ua.is_empty() || matches!(opcode, op::INQUIRY | op::REPORT_LUNS) {
            return None;
        }
        s.ua.pop_front()
    }

    /// Runs one command to completion (blocking; call it from a worker thread). `data_out` is
    /// all the Data-Out the initiator sent (its expected data transfer length), not cut to
    /// what [`Lun::data_dir_of`] said: a WRITE, WRITE SAME or COMPARE AND WRITE whose Data-Out
    /// is not the length its CDB implies gets CHECK CONDITION, as SBC asks. (A COMPARE AND
    /// WRITE of zero blocks is no error, so one whose initiator sends Data-Out anyway, as
    /// libiscsi does when it asks for 256 blocks, which the one-byte field cannot hold, must
    /// reach this with that Data-Out, or be refused by the transport.)
    pub fn execute(&self, nexus: &Nexus, cdb: &[u8], data_out: &[u8]) -> ScsiResponse {
        let epoch = self.abort_epoch.load(Ordering::Acquire);
        let opcode = match check_cdb(cdb) {
            Ok(o) => o,
            Err(r) => return r,
        };
        if let Some(ua) = self.take_ua(nexus, opcode) {
            let s = sense::fixed(key::UNIT_ATTENTION, ua.code());
            if opcode == op::REQUEST_SENSE {
                let alloc = usize::from(cdb[4]);
                let mut d = s;
                d.truncate(alloc);
                return ScsiResponse::good(d);
            }
            return ScsiResponse::check(s);
        }
        let access = access_of(opcode, cdb);
        if access == pr::Access::Always {
            return self.dispatch(nexus, opcode, cdb, data_out);
        }
        let state = self.pr.read().unwrap_or_else(|p| p.into_inner());
        if self.abort_epoch.load(Ordering::Acquire) != epoch && self.was_aborted(nexus, epoch) {
            return ScsiResponse {
                status: sense::TASK_ABORTED,
                sense: Vec::new(),
                data: Vec::new(),
            };
        }
        if !state.allows(nexus, access) {
            return ScsiResponse::conflict();
        }
        let r = self.dispatch(nexus, opcode, cdb, data_out);
        drop(state);
        r
    }

    /// Runs a batch of commands of one nexus, as [`Lun::execute`] runs each, and returns
    /// their responses in order. Each run of consecutive READs and WRITEs goes to the stack as
    /// one batch ([`BlockDevice::submit`]: the initiator's queue depth reaches the backend, in
    /// one call), with one flush after it when a write of it has FUA; any other command runs
    /// alone, in its place in the order. A run holds the reservation state shared from its
    /// access checks through its I/O, as a single command does. While the nexus has a unit
    /// attention to report (or is new), the run's commands go through [`Lun::execute`] one at
    /// a time, so the first of them reports it. Commands of one batch are in flight together,
    /// as SIMPLE tasks are: a read that overlaps a write of the same run reads either data.
    pub fn execute_batch(&self, nexus: &Nexus, cmds: &[Command<'_>]) -> Vec<ScsiResponse> {
        let mut out: Vec<Option<ScsiResponse>> = vec![None; cmds.len()];
        let mut run: Vec<usize> = Vec::new();
        for (i, c) in cmds.iter().enumerate() {
            if c.cdb.first().is_some_and(|&o| is_read_or_write(o)) {
                run.push(i);
                continue;
            }
            self.execute_run(nexus, cmds, &run, &mut out);
            run.clear();
            out[i] = Some(self.execute(nexus, c.cdb, c.data_out));
        }
        self.execute_run(nexus, cmds, &run, &mut out);
        out.into_iter()
            .map(|r| r.expect("every command of the batch ran"))
            .collect()
    }

    /// Whether `nexus` has a unit attention to report (a new nexus starts with one).
    fn has_ua(&self, nexus: &Nexus) -> bool {
        self.nexuses
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(nexus)
            .is_none_or(|s| !s.ua.is_empty())
    }

    /// The READs and WRITEs `cmds[run]` (see [`Lun::execute_batch`]), their responses put in
    /// `out`.
    fn execute_run(
        &self,
        nexus: &Nexus,
        cmds: &[Command<'_>],
        run: &[usize],
        out: &mut [Option<ScsiResponse>],
    ) {
        let epoch = self.abort_epoch.load(Ordering::Acquire);
        if run.len() < 2 || self.has_ua(nexus) {
            for &i in run {
                out[i] = Some(self.execute(nexus, cmds[i].cdb, cmds[i].data_out));
            }
            return;
        }
        let state = self.pr.read().unwrap_or_else(|p| p.into_inner());
        if self.abort_epoch.load(Ordering::Acquire) != epoch && self.was_aborted(nexus, epoch) {
            for &i in run {
                out[i] = Some(ScsiResponse {
                    status: sense::TASK_ABORTED,
                    sense: Vec::new(),
                    data: Vec::new(),
                });
            }
            return;
        }
        // Each command's checks, in order; what passes them is planned: (index, I/O, write).
        let mut planned: Vec<(usize, Io, bool)> = Vec::with_capacity(run.len());
        for &i in run {
            let Command { cdb, data_out } = cmds[i];
            let checked = check_cdb(cdb).and_then(|opcode| {
                if !state.allows(nexus, access_of(opcode, cdb)) {
                    return Err(ScsiResponse::conflict());
                }
                let write = is_medium_write(opcode);
                if write && self.export.read_only() {
                    self.export.refused();
                    return Err(write_protected());
                }
                Ok((self.rw_io(cdb, write, data_out)?, write))
            });
            match checked {
                Ok((Some(io), write)) => planned.push((i, io, write)),
                Ok((None, _)) => out[i] = Some(ScsiResponse::good(Vec::new())),
                Err(r) => out[i] = Some(r),
            }
        }
        let mut read_bufs: Vec<Vec<u8>> = planned
            .iter()
            .filter(|p| !p.2)
            .map(|p| vec![0u8; p.1.len])
            .collect();
        let writes = planned.iter().any(|p| p.2);
        let fua = planned.iter().any(|p| p.2 && p.1.fua);
        let order = writes.then(|| self.write_order.read().unwrap_or_else(|p| p.into_inner()));
        let guards: Vec<_> = planned
            .iter()
            .map(|(_, io, write)| {
                let kind = if *write { OpKind::Write } else { OpKind::Read };
                self.export.begin(kind, io.len as u64)
            })
            .collect();
        let mut results: Vec<vstor_core::Result<()>> = Vec::with_capacity(planned.len());
        let mut flushed: vstor_core::Result<()> = Ok(());
        {
            let mut reqs: Vec<Request<'_>> = Vec::with_capacity(planned.len() + 1);
            let mut bufs = read_bufs.iter_mut();
            for (i, io, write) in &planned {
                reqs.push(if *write {
                    Request::write(io.offset, cmds[*i].data_out)
                } else {
                    Request::read(io.offset, bufs.next().expect("a buffer per read"))
                });
            }
            if fua {
                reqs.push(Request::flush());
            }
            self.device().submit(&mut reqs);
            if fua {
                flushed = reqs.pop().expect("the flush").result();
            }
            results.extend(reqs.iter().map(|r| r.result()));
        }
        drop(order);
        let mut bufs = read_bufs.into_iter();
        for (((i, io, write), r), g) in planned.into_iter().zip(results).zip(guards) {
            let r = r.and_then(|()| {
                if write && io.fua {
                    flushed.clone()
                } else {
                    Ok(())
                }
            });
            g.done(r.is_ok());
            let data = if write {
                Vec::new()
            } else {
                bufs.next().expect("a buffer per read")
            };
            out[i] = Some(match r {
                Ok(()) => ScsiResponse::good(data),
                Err(e) => stack_error(&e, write),
            });
        }
        drop(state);
    }

    /// Whether a PREEMPT AND ABORT after `epoch` aborted `nexus`'s tasks.
    fn was_aborted(&self, nexus: &Nexus, epoch: u64) -> bool {
        self.aborted
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .any(|(e, n)| *e > epoch && n == nexus)
    }

    /// The I_T nexuses the LUN knows (those that sent a command and are not lost).
    fn known_nexuses(&self) -> Vec<Nexus> {
        self.nexuses
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .cloned()
            .collect()
    }

    fn persistent_reserve_in(&self, cdb: &[u8]) -> ScsiResponse {
        let alloc = usize::from(be16(cdb, 7));
        let state = self.pr.read().unwrap_or_else(|p| p.into_inner());
        match state.pr_in(cdb) {
            Ok(mut d) => {
                d.truncate(alloc);
                ScsiResponse::good(d)
            }
            Err(r) => r,
        }
    }

    fn persistent_reserve_out(&self, nexus: &Nexus, cdb: &[u8], data_out: &[u8]) -> ScsiResponse {
        let mut state = self.pr.write().unwrap_or_else(|p| p.into_inner());
        let ports = self.known_nexuses();
        let mut next = state.clone();
        let fx = match next.pr_out(nexus, cdb, data_out, &ports) {
            Ok(fx) => fx,
            Err(r) => return r,
        };
        if fx.changed {
            let mut store = self.store.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(store) = store.as_mut() {
                if let Err(e) = store.save(&next.encode()) {
                    return stack_error(&e, true);
                }
            }
        }
        *state = next;
        if !fx.ua.is_empty() {
            let mut n = self.nexuses.lock().unwrap_or_else(|p| p.into_inner());
            for (port, ua) in &fx.ua {
                for (k, s) in n.iter_mut() {
                    if k != nexus && port.matches(k) {
                        s.push(*ua);
                    }
                }
            }
        }
        if !fx.aborted.is_empty() {
            let mut victims: Vec<Nexus> = ports
                .into_iter()
                .filter(|k| k != nexus && fx.aborted.iter().any(|p| p.matches(k)))
                .collect();
            for p in &fx.aborted {
                if let Some(t) = &p.target {
                    let n = Nexus {
                        initiator: p.initiator.clone(),
                        target: t.clone(),
                    };
                    if !victims.contains(&n) && &n != nexus {
                        victims.push(n);
                    }
                }
            }
            let epoch = self.abort_epoch.load(Ordering::Acquire) + 1;
            {
                let mut a = self.aborted.lock().unwrap_or_else(|p| p.into_inner());
                for v in &victims {
                    a.push_back((epoch, v.clone()));
                }
                while a.len() > ABORTED_KEPT {
                    a.pop_front();
                }
            }
            self.abort_epoch.store(epoch, Ordering::Release);
            let hook = self
                .abort_hook
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone();
            if let Some(hook) = hook {
                hook(&victims);
            }
        }
        drop(state);
        ScsiResponse::good(Vec::new())
    }

    fn dispatch(&self, nexus: &Nexus, opcode: u8, cdb: &[u8], data_out: &[u8]) -> ScsiResponse {
        if is_medium_write(opcode) && self.export.read_only() {
            self.export.refused();
            return write_protected();
        }
        match opcode {
            op::TEST_UNIT_READY => ScsiResponse::good(Vec::new()),
            op::REQUEST_SENSE => self.request_sense(cdb),
            op::INQUIRY => self.inquiry(nexus, cdb),
            op::REPORT_LUNS => report_luns(cdb),
            op::READ_CAPACITY_10 => self.read_capacity_10(cdb),
            op::SERVICE_ACTION_IN_16 => match cdb[1] & 0x1f {
                SA_READ_CAPACITY_16 => self.read_capacity_16(cdb),
                SA_GET_LBA_STATUS => self.get_lba_status(cdb),
                _ => invalid_cdb(1),
            },
            op::READ_6 | op::READ_10 | op::READ_12 | op::READ_16 => self.read(cdb),
            op::WRITE_6 | op::WRITE_10 | op::WRITE_12 | op::WRITE_16 => self.write(cdb, data_out),
            op::WRITE_AND_VERIFY_10 | op::WRITE_AND_VERIFY_12 | op::WRITE_AND_VERIFY_16 => {
                self.write_and_verify(cdb, data_out)
            }
            op::VERIFY_10 | op::VERIFY_12 | op::VERIFY_16 => self.verify(cdb, data_out),
            op::PRE_FETCH_10 | op::PRE_FETCH_16 => {
                // No cache of its own to load: GOOD ("not all of it fits"), after the range.
                let rw = match parse_rw(cdb) {
                    Ok(rw) => rw,
                    Err(r) => return r,
                };
                match self.check_range(rw.lba, u64::from(rw.blocks)) {
                    Ok(_) => ScsiResponse::good(Vec::new()),
                    Err(r) => r,
                }
            }
            op::SYNCHRONIZE_CACHE_10 | op::SYNCHRONIZE_CACHE_16 => self.synchronize_cache(cdb),
            op::MODE_SENSE_6 | op::MODE_SENSE_10 => self.mode_sense(cdb),
            op::WRITE_SAME_10 | op::WRITE_SAME_16 => self.write_same(cdb, data_out),
            op::UNMAP => self.unmap(cdb, data_out),
            op::COMPARE_AND_WRITE => self.compare_and_write(cdb, data_out),
            op::PERSISTENT_RESERVE_IN => self.persistent_reserve_in(cdb),
            op::MAINTENANCE_IN if cdb[1] & 0x1f == SA_REPORT_SUPPORTED_OPCODES => {
                report_supported_opcodes(cdb)
            }
            op::MAINTENANCE_IN => invalid_cdb(1),
            op::PERSISTENT_RESERVE_OUT => self.persistent_reserve_out(nexus, cdb, data_out),
            _ => invalid_opcode(),
        }
    }

    fn request_sense(&self, cdb: &[u8]) -> ScsiResponse {
        let mut s = sense::fixed(key::NO_SENSE, asc::NONE);
        s.truncate(usize::from(cdb[4]));
        ScsiResponse::good(s)
    }

    /// Capacity in logical blocks, and the block size.
    fn geometry(&self) -> (u64, u32) {
        let info = self.device().info();
        let bs = info.logical_sector_size.max(1);
        (info.capacity / u64::from(bs), bs)
    }

    fn read_capacity_10(&self, cdb: &[u8]) -> ScsiResponse {
        // PMI is obsolete; a non-zero LBA without it is an error.
        if cdb[8] & 1 == 0 && be32(cdb, 2) != 0 {
            return invalid_cdb(2);
        }
        let (blocks, bs) = self.geometry();
        let last = blocks.saturating_sub(1).min(u64::from(u32::MAX)) as u32;
        let mut d = Vec::with_capacity(8);
        d.extend_from_slice(&last.to_be_bytes());
        d.extend_from_slice(&bs.to_be_bytes());
        ScsiResponse::good(d)
    }

    /// Whether unmapping is on offer: the stack discards (a thin stack), or at least writes
    /// zeroes that unmap where they can.
    fn thin(&self) -> bool {
        self.device().info().supports.discard
    }

    /// Whether unmapped blocks read as zeroes.
    fn lbprz(&self) -> bool {
        let i = self.device().info();
        i.supports.discard && i.discard_zeroes
    }

    fn read_capacity_16(&self, cdb: &[u8]) -> ScsiResponse {
        let alloc = be32(cdb, 10) as usize;
        let (blocks, bs) = self.geometry();
        let mut d = vec![0u8; 32];
        d[0..8].copy_from_slice(&blocks.saturating_sub(1).to_be_bytes());
        d[8..12].copy_from_slice(&bs.to_be_bytes());
        // LOGICAL BLOCKS PER PHYSICAL BLOCK EXPONENT stays 0 (not reported): the stack takes
        // every logical block on its own, and UNMAP and GET LBA STATUS work per logical block.
        // VPD 0xB0's OPTIMAL TRANSFER LENGTH GRANULARITY carries the physical block size.
        if self.thin() {
            d[14] |= 0x80; // LBPME
            if self.lbprz() {
                d[14] |= 0x40; // LBPRZ
            }
        }
        d.truncate(alloc);
        ScsiResponse::good(d)
    }

    /// Checks `lba + blocks` against the capacity.
    fn check_range(&self, lba: u64, blocks: u64) -> Result<(u64, u32), ScsiResponse> {
        let (cap, bs) = self.geometry();
        if lba.checked_add(blocks).is_none_or(|end| end > cap) {
            self.export.refused();
            return Err(lba_out_of_range());
        }
        Ok((cap, bs))
    }

    /// Checks a READ or WRITE CDB (and a write's Data-Out length) against this LUN: the I/O
    /// it asks for, None when it moves no block.
    fn rw_io(&self, cdb: &[u8], write: bool, data_out: &[u8]) -> Result<Option<Io>, ScsiResponse> {
        let rw = parse_rw(cdb)?;
        let (_, bs) = self.check_range(rw.lba, u64::from(rw.blocks))?;
        if rw.blocks == 0 {
            return Ok(None);
        }
        if rw.blocks > max_transfer_blocks(bs) {
            return Err(invalid_cdb(if matches!(cdb[0], op::READ_6 | op::WRITE_6) {
                4
            } else {
                7
            }));
        }
        let len = rw.blocks as usize * bs as usize;
        if write && data_out.len() != len {
            self.export.refused();
            return Err(ScsiResponse::sense(
                key::ILLEGAL_REQUEST,
                asc::PARAMETER_LIST_LENGTH,
            ));
        }
        Ok(Some(Io {
            offset: rw.lba * u64::from(bs),
            len,
            fua: rw.fua,
        }))
    }

    fn read(&self, cdb: &[u8]) -> ScsiResponse {
        let io = match self.rw_io(cdb, false, &[]) {
            Ok(Some(io)) => io,
            Ok(None) => return ScsiResponse::good(Vec::new()),
            Err(r) => return r,
        };
        let mut data = vec![0u8; io.len];
        let g = self.export.begin(OpKind::Read, io.len as u64);
        let r = self.device().read_at(io.offset, &mut data);
        g.done(r.is_ok());
        match r {
            Ok(()) => ScsiResponse::good(data),
            Err(e) => stack_error(&e, false),
        }
    }

    fn write(&self, cdb: &[u8], data_out: &[u8]) -> ScsiResponse {
        let io = match self.rw_io(cdb, true, data_out) {
            Ok(Some(io)) => io,
            Ok(None) => return ScsiResponse::good(Vec::new()),
            Err(r) => return r,
        };
        let _order = self.write_order.read().unwrap_or_else(|p| p.into_inner());
        self.write_blocks(io.offset, data_out, io.fua)
    }

    /// Writes `data` at byte `offset`, then flushes if `fua`.
    fn write_blocks(&self, offset: u64, data: &[u8], fua: bool) -> ScsiResponse {
        let g = self.export.begin(OpKind::Write, data.len() as u64);
        let mut r = self.device().write_at(offset, data);
        if r.is_ok() && fua {
            r = self.device().flush();
        }
        g.done(r.is_ok());
        match r {
            Ok(()) => ScsiResponse::good(Vec::new()),
            Err(e) => stack_error(&e, true),
        }
    }

    /// WRITE AND VERIFY: the write, made durable (the stack's own checks are the verify).
    fn write_and_verify(&self, cdb: &[u8], data_out: &[u8]) -> ScsiResponse {
        if (cdb[1] >> 1) & 3 > 1 {
            return invalid_cdb(1);
        }
        let mut c = cdb.to_vec();
        c[1] |= 0x08; // as FUA
        self.write(&c, data_out)
    }

    /// VERIFY: reads the blocks (BYTCHK 0), or compares them with the Data-Out (BYTCHK 1),
    /// or each of them with one block of Data-Out (BYTCHK 3).
    fn verify(&self, cdb: &[u8], data_out: &[u8]) -> ScsiResponse {
        let rw = match parse_rw(cdb) {
            Ok(rw) => rw,
            Err(r) => return r,
        };
        let bytchk = (cdb[1] >> 1) & 3;
        if bytchk == 2 {
            return invalid_cdb(1);
        }
        let (_, bs) = match self.check_range(rw.lba, u64::from(rw.blocks)) {
            Ok(g) => g,
            Err(r) => return r,
        };
        if rw.blocks == 0 {
            return ScsiResponse::good(Vec::new());
        }
        if rw.blocks > max_transfer_blocks(bs) {
            return invalid_cdb(if cdb[0] == op::VERIFY_10 { 7 } else { 6 });
        }
        let len = (rw.blocks * bs) as usize;
        let want = match bytchk {
            0 => 0,
            1 => len,
            _ => bs as usize,
        };
        if data_out.len() != want {
            return ScsiResponse::sense(key::ILLEGAL_REQUEST, asc::PARAMETER_LIST_LENGTH);
        }
        let mut cur = vec![0u8; len];
        let g = self.export.begin(OpKind::Read, len as u64);
        let r = self.device().read_at(rw.lba * u64::from(bs), &mut cur);
        g.done(r.is_ok());
        if let Err(e) = r {
            return stack_error(&e, false);
        }
        let differs = match bytchk {
            0 => None,
            1 => cur.iter().zip(data_out).position(|(a, b)| a != b),
            _ => cur
                .iter()
                .enumerate()
                .position(|(i, b)| *b != data_out[i % bs as usize]),
        };
        match differs {
            Some(i) => ScsiResponse::check(sense::with_information(
                key::MISCOMPARE,
                asc::MISCOMPARE_VERIFY,
                i as u32,
            )),
            None => ScsiResponse::good(Vec::new()),
        }
    }

    fn synchronize_cache(&self, cdb: &[u8]) -> ScsiResponse {
        let (lba, blocks) = if cdb[0] == op::SYNCHRONIZE_CACHE_10 {
            (u64::from(be32(cdb, 2)), u64::from(be16(cdb, 7)))
        } else {
            (be64(cdb, 2), u64::from(be32(cdb, 10)))
        };
        if let Err(r) = self.check_range(lba, blocks) {
            return r;
        }
        let g = self.export.begin(OpKind::Flush, 0);
        let r = self.device().flush();
        g.done(r.is_ok());
        match r {
            Ok(()) => ScsiResponse::good(Vec::new()),
            Err(e) => stack_error(&e, true),
        }
    }

    fn inquiry(&self, nexus: &Nexus, cdb: &[u8]) -> ScsiResponse {
        let evpd = cdb[1] & 1 != 0;
        if cdb[1] & 0xfe != 0 {
            return invalid_cdb(1); // CMDDT (obsolete) or reserved bits
        }
        let alloc = usize::from(be16(cdb, 3));
        let page = cdb[2];
        let mut d = if !evpd {
            if page != 0 {
                return invalid_cdb(2);
            }
            self.standard_inquiry()
        } else {
            match self.vpd(page, nexus) {
                Some(d) => d,
                None => return invalid_cdb(2),
            }
        };
        d.truncate(alloc);
        ScsiResponse::good(d)
    }

    fn standard_inquiry(&self) -> Vec<u8> {
        let mut d = vec![0u8; 66];
        d[0] = 0x00; // peripheral qualifier 0, direct access block device
        d[2] = 0x06; // SPC-4
        d[3] = 0x12; // HISUP, response data format 2
        d[4] = (d.len() - 5) as u8;
        d[7] = 0x02; // CMDQUE
        put_ascii(&mut d[8..16], &self.config.vendor);
        put_ascii(&mut d[16..32], &self.config.product);
        put_ascii(&mut d[32..36], env!("CARGO_PKG_VERSION"));
        // Version descriptors: SAM-5, SPC-4, SBC-3, iSCSI.
        for (i, v) in [0x00a0u16, 0x0460, 0x04c0, 0x0960].iter().enumerate() {
            d[58 + 2 * i..60 + 2 * i].copy_from_slice(&v.to_be_bytes());
        }
        d
    }

    /// The VPD pages this LUN offers, in ascending order.
    const VPD_PAGES: [u8; 6] = [0x00, 0x80, 0x83, 0xb0, 0xb1, 0xb2];

    fn vpd(&self, page: u8, nexus: &Nexus) -> Option<Vec<u8>> {
        let body: Vec<u8> = match page {
            0x00 => Self::VPD_PAGES.to_vec(),
            0x80 => {
                let mut s: Vec<u8> = self
                    .config
                    .serial
                    .bytes()
                    .map(|b| if (0x20..0x7f).contains(&b) { b } else { b'_' })
                    .collect();
                s.truncate(252);
                s
            }
            0x83 => self.device_identification(nexus),
            0xb0 => self.block_limits(),
            0xb1 => {
                let mut b = vec![0u8; 0x3c];
                b[0..2].copy_from_slice(&1u16.to_be_bytes()); // non-rotating medium
                b
            }
            0xb2 => {
                let mut b = vec![0u8; 4];
                if self.thin() {
                    b[1] = 0x80 | 0x40 | 0x20; // LBPU, LBPWS, LBPWS10
                    if self.lbprz() {
                        b[1] |= 0x04; // LBPRZ
                    }
                    b[2] = 0x02; // thin provisioned
                }
                b
            }
            _ => return None,
        };
        let mut d = vec![0u8, page];
        d.extend_from_slice(&(body.len() as u16).to_be_bytes());
        d.extend_from_slice(&body);
        Some(d)
    }

    fn device_identification(&self, nexus: &Nexus) -> Vec<u8> {
        let mut out = Vec::new();
        // NAA (IEEE registered, 8 bytes), associated with the logical unit: binary.
        let mut naa = self.config.naa;
        if !matches!(naa >> 60, 2 | 3 | 5) {
            naa = (naa & 0x0fff_ffff_ffff_ffff) | (5 << 60);
        }
        out.extend_from_slice(&[0x01, 0x03, 0x00, 0x08]);
        out.extend_from_slice(&naa.to_be_bytes());
        // T10 vendor ID: vendor identification and the serial, ASCII.
        let mut t10 = vec![b' '; 8];
        put_ascii(&mut t10, &self.config.vendor);
        t10.extend(
            self.config
                .serial
                .bytes()
                .filter(|b| (0x21..0x7f).contains(b))
                .take(200),
        );
        out.extend_from_slice(&[0x02, 0x01, 0x00, t10.len() as u8]);
        out.extend_from_slice(&t10);
        // Relative target port 1, associated with the target port (iSCSI, PIV).
        out.extend_from_slice(&[0x51, 0x94, 0x00, 0x04, 0, 0, 0, 1]);
        // The target port's SCSI name string (UTF-8, NUL-terminated, padded to 4 bytes).
        if !nexus.target.is_empty() {
            let mut name: Vec<u8> = nexus.target.bytes().take(250).collect();
            name.push(0);
            while name.len() % 4 != 0 {
                name.push(0);
            }
            out.extend_from_slice(&[0x53, 0x98, 0x00, name.len() as u8]);
            out.extend_from_slice(&name);
        }
        out
    }

    fn block_limits(&self) -> Vec<u8> {
        let info = self.device().info();
        let bs = info.logical_sector_size.max(1);
        let mut b = vec![0u8; 0x3c];
        b[0] = 0x01; // WSNZ: a WRITE SAME of zero blocks is refused
        b[1] = MAX_COMPARE_AND_WRITE_BLOCKS;
        let gran = (info.physical_sector_size / bs).max(1) as u16;
        b[2..4].copy_from_slice(&gran.to_be_bytes());
        b[4..8].copy_from_slice(&max_transfer_blocks(bs).to_be_bytes());
        b[8..12].copy_from_slice(&((1u32 << 20) / bs).to_be_bytes());
        if self.thin() {
            b[16..20].copy_from_slice(&MAX_UNMAP_BLOCKS.to_be_bytes());
            b[20..24].copy_from_slice(&MAX_UNMAP_DESCRIPTORS.to_be_bytes());
        }
        b[32..40].copy_from_slice(&u64::from(MAX_WRITE_SAME_BLOCKS).to_be_bytes());
        b
    }

    fn mode_sense(&self, cdb: &[u8]) -> ScsiResponse {
        let ten = cdb[0] == op::MODE_SENSE_10;
        let dbd = cdb[1] & 0x08 != 0;
        let llbaa = ten && cdb[1] & 0x10 != 0;
        let pc = cdb[2] >> 6;
        let page = cdb[2] & 0x3f;
        let subpage = cdb[3];
        let alloc = if ten {
            usize::from(be16(cdb, 7))
        } else {
            usize::from(cdb[4])
        };
        if pc == 3 {
            return ScsiResponse::sense(key::ILLEGAL_REQUEST, asc::SAVING_PARAMETERS_NOT_SUPPORTED);
        }
        let changeable = pc == 1;
        let mut pages = Vec::new();
        let all = page == 0x3f;
        if all && subpage != 0 && subpage != 0xff {
            return invalid_cdb(3);
        }
        if !all && subpage != 0 {
            return invalid_cdb(3);
        }
        if all || page == 0x08 {
            pages.extend_from_slice(&self.caching_page(changeable));
        }
        if all || page == 0x0a {
            pages.extend_from_slice(&self.control_page(changeable));
        }
        if all || page == 0x1c {
            pages.extend_from_slice(&informational_exceptions_page(changeable));
        }
        if pages.is_empty() {
            return invalid_cdb(2);
        }
        let (blocks, bs) = self.geometry();
        let desc: Vec<u8> = if dbd {
            Vec::new()
        } else if llbaa {
            let mut d = vec![0u8; 16];
            d[0..8].copy_from_slice(&blocks.to_be_bytes());
            d[12..16].copy_from_slice(&bs.to_be_bytes());
            d
        } else {
            let mut d = vec![0u8; 8];
            d[0..4].copy_from_slice(&(blocks.min(0xffff_ffff) as u32).to_be_bytes());
            d[5..8].copy_from_slice(&bs.to_be_bytes()[1..4]);
            d
        };
        let mut dsp = 0x10; // DPOFUA
        if self.export.read_only() {
            dsp |= 0x80; // WP
        }
        let mut d = if ten {
            let mut h = vec![0u8; 8];
            h[3] = dsp;
            if llbaa && !dbd {
                h[4] = 0x01; // LONGLBA
            }
            h[6..8].copy_from_slice(&(desc.len() as u16).to_be_bytes());
            h
        } else {
            vec![0, 0, dsp, desc.len() as u8]
        };
        d.extend_from_slice(&desc);
        d.extend_from_slice(&pages);
        if ten {
            let n = (d.len() - 2) as u16;
            d[0..2].copy_from_slice(&n.to_be_bytes());
        } else {
            d[0] = (d.len() - 1).min(255) as u8;
        }
        d.truncate(alloc);
        ScsiResponse::good(d)
    }

    fn caching_page(&self, changeable: bool) -> Vec<u8> {
        let mut p = vec![0u8; 20];
        p[0] = 0x08;
        p[1] = 0x12;
        if !changeable && self.device().info().supports.flush {
            p[2] = 0x04; // WCE: the stack has a volatile cache; SYNCHRONIZE CACHE flushes it
        }
        p
    }

    fn control_page(&self, changeable: bool) -> Vec<u8> {
        let mut p = vec![0u8; 12];
        p[0] = 0x0a;
        p[1] = 0x0a;
        if !changeable {
            p[3] = 0x10; // QUEUE ALGORITHM MODIFIER 1: unrestricted reordering
            if self.export.read_only() {
                p[4] = 0x08; // SWP
            }
            p[8..10].copy_from_slice(&0xffffu16.to_be_bytes()); // busy timeout: unlimited
        }
        p
    }

    fn get_lba_status(&self, cdb: &[u8]) -> ScsiResponse {
        let lba = be64(cdb, 2);
        let alloc = be32(cdb, 10) as usize;
        let (cap, bs) = self.geometry();
        if lba >= cap {
            return lba_out_of_range();
        }
        // Report at most as many descriptors as the allocation length holds, over at most
        // 1 GiB of the device.
        let want = alloc.saturating_sub(8) / 16;
        let span = (cap - lba).min((1u64 << 30) / u64::from(bs)).max(1);
        let off = lba * u64::from(bs);
        let extents = match self.device().allocation(off, span * u64::from(bs)) {
            Ok(e) => e,
            Err(e) => return stack_error(&e, false),
        };
        let mut descs = Vec::new();
        let mut at = lba;
        for e in extents {
            let n = e.len / u64::from(bs);
            if n == 0 {
                continue;
            }
            let status = u8::from(e.depth == 0);
            let mut left = n;
            while left > 0 {
                let chunk = left.min(u64::from(u32::MAX));
                descs.push((at, chunk as u32, status));
                at += chunk;
                left -= chunk;
            }
        }
        // Neighbouring descriptors of the same status are one.
        let mut merged: Vec<(u64, u32, u8)> = Vec::new();
        for d in descs {
            match merged.last_mut() {
                Some(l) if l.2 == d.2 && l.0 + u64::from(l.1) == d.0 => {
                    if let Some(s) = l.1.checked_add(d.1) {
                        l.1 = s;
                        continue;
                    }
                    merged.push(d);
                }
                _ => merged.push(d),
            }
        }
        merged.truncate(want.max(1));
        let mut d = vec![0u8; 8];
        for (l, n, s) in &merged {
            d.extend_from_slice(&l.to_be_bytes());
            d.extend_from_slice(&n.to_be_bytes());
            d.extend_from_slice(&[*s, 0, 0, 0]);
        }
        let plen = (d.len() - 4) as u32;
        d[0..4].copy_from_slice(&plen.to_be_bytes());
        d.truncate(alloc);
        ScsiResponse::good(d)
    }

    fn unmap(&self, cdb: &[u8], data_out: &[u8]) -> ScsiResponse {
        if !self.thin() {
            // VPD 0xB2 says LBPU=0: there is no UNMAP.
            return invalid_opcode();
        }
        if cdb[1] & 0x01 != 0 {
            return invalid_cdb(1); // ANCHOR: no anchored state
        }
        let plen = usize::from(be16(cdb, 7));
        if plen == 0 {
            return ScsiResponse::good(Vec::new());
        }
        if plen < 8 || data_out.len() < plen {
            return ScsiResponse::sense(key::ILLEGAL_REQUEST, asc::PARAMETER_LIST_LENGTH);
        }
        let p = &data_out[..plen];
        let bdl = usize::from(be16(p, 2));
        if bdl % 16 != 0 || 8 + bdl > plen {
            return ScsiResponse::sense(key::ILLEGAL_REQUEST, asc::PARAMETER_LIST_LENGTH);
        }
        if bdl / 16 > MAX_UNMAP_DESCRIPTORS as usize {
            return invalid_param(2);
        }
        let (cap, bs) = self.geometry();
        let mut ranges = Vec::new();
        for (i, d) in p[8..8 + bdl].chunks_exact(16).enumerate() {
            let lba = be64(d, 0);
            let n = be32(d, 8);
            if lba.checked_add(u64::from(n)).is_none_or(|e| e > cap) {
                self.export.refused();
                return lba_out_of_range();
            }
            if n > MAX_UNMAP_BLOCKS {
                return invalid_param(8 + 16 * i as u16 + 8);
            }
            if n > 0 {
                ranges.push((lba * u64::from(bs), u64::from(n) * u64::from(bs)));
            }
        }
        let _order = self.write_order.read().unwrap_or_else(|p| p.into_inner());
        for (off, len) in ranges {
            if let Err(r) = self.deallocate(off, len) {
                return r;
            }
        }
        ScsiResponse::good(Vec::new())
    }

    /// Unmaps `[off, off + len)`: discard where the stack discards (and a discarded range reads
    /// back as zeroes, as LBPRZ promises), write-zeroes otherwise.
    fn deallocate(&self, off: u64, len: u64) -> Result<(), ScsiResponse> {
        let info = self.device().info();
        let r = if info.supports.discard && info.discard_zeroes {
            let g = self.export.begin(OpKind::Discard, len);
            let r = self.device().discard(off, len);
            g.done(r.is_ok());
            r
        } else {
            let g = self.export.begin(OpKind::WriteZeroes, len);
            let r = self.zero(off, len);
            g.done(r.is_ok());
            r
        };
        r.map_err(|e| stack_error(&e, true))
    }

    /// Write-zeroes where the stack has it, zeroes written elsewhere.
    fn zero(&self, off: u64, len: u64) -> vstor_core::Result<()> {
        if self.device().info().supports.write_zeroes {
            return self.device().write_zeroes(off, len);
        }
        let chunk = vec![0u8; WRITE_SAME_CHUNK.min(len as usize)];
        let mut at = 0;
        while at < len {
            let n = (len - at).min(chunk.len() as u64) as usize;
            self.device().write_at(off + at, &chunk[..n])?;
            at += n as u64;
        }
        Ok(())
    }

    fn write_same(&self, cdb: &[u8], data_out: &[u8]) -> ScsiResponse {
        let sixteen = cdb[0] == op::WRITE_SAME_16;
        if cdb[1] & 0xe0 != 0 {
            return invalid_cdb(1); // WRPROTECT: no protection information
        }
        if cdb[1] & 0x10 != 0 {
            return invalid_cdb(1); // ANCHOR
        }
        let unmap = cdb[1] & 0x08 != 0;
        let ndob = sixteen && cdb[1] & 0x01 != 0;
        let (lba, blocks) = if sixteen {
            (be64(cdb, 2), u64::from(be32(cdb, 10)))
        } else {
            (u64::from(be32(cdb, 2)), u64::from(be16(cdb, 7)))
        };
        if blocks == 0 {
            return invalid_cdb(if sixteen { 10 } else { 7 }); // WSNZ
        }
        let (_, bs) = match self.check_range(lba, blocks) {
            Ok(g) => g,
            Err(r) => return r,
        };
        if blocks > u64::from(MAX_WRITE_SAME_BLOCKS) {
            return invalid_cdb(if sixteen { 10 } else { 7 });
        }
        if unmap && !self.thin() {
            return invalid_cdb(1);
        }
        let block: Vec<u8> = if ndob {
            vec![0u8; bs as usize]
        } else {
            if data_out.len() != bs as usize {
                return ScsiResponse::sense(key::ILLEGAL_REQUEST, asc::PARAMETER_LIST_LENGTH);
            }
            data_out.to_vec()
        };
        let off = lba * u64::from(bs);
        let len = blocks * u64::from(bs);
        let _order = self.write_order.read().unwrap_or_else(|p| p.into_inner());
        let zeroes = block.iter().all(|&b| b == 0);
        if zeroes {
            if unmap {
                return match self.deallocate(off, len) {
                    Ok(()) => ScsiResponse::good(Vec::new()),
                    Err(r) => r,
                };
            }
            let g = self.export.begin(OpKind::WriteZeroes, len);
            let r = self.zero(off, len);
            g.done(r.is_ok());
            return match r {
                Ok(()) => ScsiResponse::good(Vec::new()),
                Err(e) => stack_error(&e, true),
            };
        }
        let per = (WRITE_SAME_CHUNK / bs as usize).max(1);
        let n = (blocks as usize).min(per);
        let chunk: Vec<u8> = block.repeat(n);
        let mut at = 0u64;
        while at < len {
            let k = (len - at).min(chunk.len() as u64) as usize;
            let r = self.write_blocks(off + at, &chunk[..k], false);
            if r.status != GOOD {
                return r;
            }
            at += k as u64;
        }
        ScsiResponse::good(Vec::new())
    }

    fn compare_and_write(&self, cdb: &[u8], data_out: &[u8]) -> ScsiResponse {
        if cdb[1] & 0xe0 != 0 {
            return invalid_cdb(1); // WRPROTECT
        }
        let fua = cdb[1] & 0x08 != 0;
        let lba = be64(cdb, 2);
        let blocks = cdb[13];
        let (_, bs) = match self.check_range(lba, u64::from(blocks)) {
            Ok(g) => g,
            Err(r) => return r,
        };
        if blocks == 0 {
            // No error, unless Data-Out came anyway: a count the one-byte field could not
            // hold (256 blocks read as 0).
            if !data_out.is_empty() {
                return invalid_cdb(13);
            }
            return ScsiResponse::good(Vec::new());
        }
        if blocks > MAX_COMPARE_AND_WRITE_BLOCKS {
            return invalid_cdb(13);
        }
        let len = usize::from(blocks) * bs as usize;
        if data_out.len() != 2 * len {
            return invalid_cdb(13);
        }
        let (verify, new) = data_out.split_at(len);
        let off = lba * u64::from(bs);
        let _order = self.write_order.write().unwrap_or_else(|p| p.into_inner());
        let mut cur = vec![0u8; len];
        let g = self.export.begin(OpKind::Read, len as u64);
        let r = self.device().read_at(off, &mut cur);
        g.done(r.is_ok());
        if let Err(e) = r {
            return stack_error(&e, false);
        }
        if let Some(i) = cur.iter().zip(verify).position(|(a, b)| a != b) {
            return ScsiResponse::check(sense::with_information(
                key::MISCOMPARE,
                asc::MISCOMPARE_VERIFY,
                i as u32,
            ));
        }
        self.write_blocks(off, new, fua)
    }
}

fn informational_exceptions_page(_changeable: bool) -> Vec<u8> {
    let mut p = vec![0u8; 12];
    p[0] = 0x1c;
    p[1] = 0x0a;
    p
}

/// Copies `s` into `dst` as printable ASCII, padded with spaces.
fn put_ascii(dst: &mut [u8], s: &str) {
    dst.fill(b' ');
    for (d, b) in dst.iter_mut().zip(s.bytes()) {
        *d = if (0x20..0x7f).contains(&b) { b } else { b' ' };
    }
}

fn report_luns(cdb: &[u8]) -> ScsiResponse {
    let select = cdb[2];
    let alloc = be32(cdb, 6) as usize;
    if alloc < 16 {
        return invalid_cdb(6);
    }
    let luns: &[u64] = match select {
        0x00 | 0x02 => &[0],
        0x01 | 0x10 | 0x12 => &[],
        0x11 => &[0],
        _ => return invalid_cdb(2),
    };
    let mut d = vec![0u8; 8];
    d[0..4].copy_from_slice(&((luns.len() * 8) as u32).to_be_bytes());
    for l in luns {
        d.extend_from_slice(&l.to_be_bytes());
    }
    d.truncate(alloc);
    ScsiResponse::good(d)
}

/// How the reservation treats a command (see [`pr::Access`]).
fn access_of(opcode: u8, cdb: &[u8]) -> pr::Access {
    match opcode {
        op::SERVICE_ACTION_IN_16 if cdb[1] & 0x1f == SA_READ_CAPACITY_16 => pr::Access::Always,
        op::SERVICE_ACTION_IN_16
        | op::READ_6
        | op::READ_10
        | op::READ_12
        | op::READ_16
        | op::MODE_SENSE_6
        | op::MODE_SENSE_10
        | op::VERIFY_10
        | op::VERIFY_12
        | op::VERIFY_16
        | op::PRE_FETCH_10
        | op::PRE_FETCH_16 => pr::Access::Read,
        op::WRITE_6
        | op::WRITE_10
        | op::WRITE_12
        | op::WRITE_16
        | op::WRITE_SAME_10
        | op::WRITE_SAME_16
        | op::UNMAP
        | op::COMPARE_AND_WRITE
        | op::WRITE_AND_VERIFY_10
        | op::WRITE_AND_VERIFY_12
        | op::WRITE_AND_VERIFY_16
        | op::SYNCHRONIZE_CACHE_10
        | op::SYNCHRONIZE_CACHE_16 => pr::Access::Write,
        _ => pr::Access::Always,
    }
}

/// MAINTENANCE IN service action REPORT SUPPORTED OPERATION CODES.
const SA_REPORT_SUPPORTED_OPCODES: u8 = 0x0c;

/// Every command this LUN runs: operation code, service action (None: the operation code has
/// none), and its CDB usage data (the CDB's bits the LUN looks at; byte 0 the operation code).
const SUPPORTED: &[(u8, Option<u16>, &[u8])] = &[
    (op::TEST_UNIT_READY, None, &[0x00, 0, 0, 0, 0, 0]),
    (op::REQUEST_SENSE, None, &[0x03, 0x01, 0, 0, 0xff, 0]),
    (op::READ_6, None, &[0x08, 0x1f, 0xff, 0xff, 0xff, 0]),
    (op::WRITE_6, None, &[0x0a, 0x1f, 0xff, 0xff, 0xff, 0]),
    (op::INQUIRY, None, &[0x12, 0x01, 0xff, 0xff, 0xff, 0]),
    (op::MODE_SENSE_6, None, &[0x1a, 0x08, 0xff, 0xff, 0xff, 0]),
    (
        op::READ_CAPACITY_10,
        None,
        &[0x25, 0, 0xff, 0xff, 0xff, 0xff, 0, 0, 0x01, 0],
    ),
    (
        op::READ_10,
        None,
        &[0x28, 0x18, 0xff, 0xff, 0xff, 0xff, 0, 0xff, 0xff, 0],
    ),
    (
        op::WRITE_10,
        None,
        &[0x2a, 0x18, 0xff, 0xff, 0xff, 0xff, 0, 0xff, 0xff, 0],
    ),
    (
        op::WRITE_AND_VERIFY_10,
        None,
        &[0x2e, 0x12, 0xff, 0xff, 0xff, 0xff, 0, 0xff, 0xff, 0],
    ),
    (
        op::VERIFY_10,
        None,
        &[0x2f, 0x16, 0xff, 0xff, 0xff, 0xff, 0, 0xff, 0xff, 0],
    ),
    (
        op::SYNCHRONIZE_CACHE_10,
        None,
        &[0x35, 0x02, 0xff, 0xff, 0xff, 0xff, 0, 0xff, 0xff, 0],
    ),
    (
        op::PRE_FETCH_10,
        None,
        &[0x34, 0x02, 0xff, 0xff, 0xff, 0xff, 0x1f, 0xff, 0xff, 0],
    ),
    (
        op::PRE_FETCH_16,
        None,
        &[
            0x90, 0x02, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
            0x1f, 0,
        ],
    ),
    (
        op::WRITE_SAME_10,
        None,
        &[0x41, 0x08, 0xff, 0xff, 0xff, 0xff, 0, 0xff, 0xff, 0],
    ),
    (op::UNMAP, None, &[0x42, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 0]),
    (
        op::MODE_SENSE_10,
        None,
        &[0x5a, 0x18, 0xff, 0xff, 0, 0, 0, 0xff, 0xff, 0],
    ),
    (
        op::PERSISTENT_RESERVE_IN,
        Some(0),
        &[0x5e, 0x1f, 0, 0, 0, 0, 0, 0xff, 0xff, 0],
    ),
    (
        op::PERSISTENT_RESERVE_IN,
        Some(1),
        &[0x5e, 0x1f, 0, 0, 0, 0, 0, 0xff, 0xff, 0],
    ),
    (
        op::PERSISTENT_RESERVE_IN,
        Some(2),
        &[0x5e, 0x1f, 0, 0, 0, 0, 0, 0xff, 0xff, 0],
    ),
    (
        op::PERSISTENT_RESERVE_IN,
        Some(3),
        &[0x5e, 0x1f, 0, 0, 0, 0, 0, 0xff, 0xff, 0],
    ),
    (
        op::PERSISTENT_RESERVE_OUT,
        Some(0),
        &[0x5f, 0x1f, 0xff, 0, 0, 0xff, 0xff, 0xff, 0xff, 0],
    ),
    (
        op::PERSISTENT_RESERVE_OUT,
        Some(1),
        &[0x5f, 0x1f, 0xff, 0, 0, 0xff, 0xff, 0xff, 0xff, 0],
    ),
    (
        op::PERSISTENT_RESERVE_OUT,
        Some(2),
        &[0x5f, 0x1f, 0xff, 0, 0, 0xff, 0xff, 0xff, 0xff, 0],
    ),
    (
        op::PERSISTENT_RESERVE_OUT,
        Some(3),
        &[0x5f, 0x1f, 0xff, 0, 0, 0xff, 0xff, 0xff, 0xff, 0],
    ),
    (
        op::PERSISTENT_RESERVE_OUT,
        Some(4),
        &[0x5f, 0x1f, 0xff, 0, 0, 0xff, 0xff, 0xff, 0xff, 0],
    ),
    (
        op::PERSISTENT_RESERVE_OUT,
        Some(5),
        &[0x5f, 0x1f, 0xff, 0, 0, 0xff, 0xff, 0xff, 0xff, 0],
    ),
    (
        op::PERSISTENT_RESERVE_OUT,
        Some(6),
        &[0x5f, 0x1f, 0xff, 0, 0, 0xff, 0xff, 0xff, 0xff, 0],
    ),
    (
        op::PERSISTENT_RESERVE_OUT,
        Some(7),
        &[0x5f, 0x1f, 0xff, 0, 0, 0xff, 0xff, 0xff, 0xff, 0],
    ),
    (op::READ_16, None, &RW16_USAGE[0]),
    (
        op::COMPARE_AND_WRITE,
        None,
        &[
            0x89, 0x18, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0xff, 0, 0,
        ],
    ),
    (op::WRITE_16, None, &RW16_USAGE[1]),
    (op::WRITE_AND_VERIFY_16, None, &RW16_USAGE[2]),
    (op::VERIFY_16, None, &RW16_USAGE[3]),
    (op::SYNCHRONIZE_CACHE_16, None, &RW16_USAGE[4]),
    (op::WRITE_SAME_16, None, &RW16_USAGE[5]),
    (
        op::SERVICE_ACTION_IN_16,
        Some(SA_READ_CAPACITY_16 as u16),
        &RW16_USAGE[6],
    ),
    (
        op::SERVICE_ACTION_IN_16,
        Some(SA_GET_LBA_STATUS as u16),
        &RW16_USAGE[7],
    ),
    (
        op::REPORT_LUNS,
        None,
        &[0xa0, 0, 0xff, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0, 0],
    ),
    (
        op::MAINTENANCE_IN,
        Some(SA_REPORT_SUPPORTED_OPCODES as u16),
        &[
            0xa3, 0x1f, 0x87, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0, 0,
        ],
    ),
    (op::READ_12, None, &RW12_USAGE[0]),
    (op::WRITE_12, None, &RW12_USAGE[1]),
    (op::WRITE_AND_VERIFY_12, None, &RW12_USAGE[2]),
    (op::VERIFY_12, None, &RW12_USAGE[3]),
];

/// CDB usage data of the 16-byte commands with an LBA and a length.
const RW16_USAGE: [[u8; 16]; 8] = {
    let flags = [
        (0x88, 0x18),
        (0x8a, 0x18),
        (0x8e, 0x12),
        (0x8f, 0x16),
        (0x91, 0x02),
        (0x93, 0x09),
        (0x9e, 0x1f),
        (0x9e, 0x1f),
    ];
    let mut t = [[0u8; 16]; 8];
    let mut i = 0;
    while i < 8 {
        t[i][0] = flags[i].0;
        t[i][1] = flags[i].1;
        let mut j = 2;
        while j < 14 {
            t[i][j] = 0xff;
            j += 1;
        }
        i += 1;
    }
    t
};

/// CDB usage data of the 12-byte commands with an LBA and a length.
const RW12_USAGE: [[u8; 12]; 4] = {
    let flags = [(0xa8, 0x18), (0xaa, 0x18), (0xae, 0x12), (0xaf, 0x16)];
    let mut t = [[0u8; 12]; 4];
    let mut i = 0;
    while i < 4 {
        t[i][0] = flags[i].0;
        t[i][1] = flags[i].1;
        let mut j = 2;
        while j < 10 {
            t[i][j] = 0xff;
            j += 1;
        }
        i += 1;
    }
    t
};

/// The command timeouts descriptor (RCTD): no timeouts are reported.
const TIMEOUTS: [u8; 12] = [0, 0x0a, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];

fn report_supported_opcodes(cdb: &[u8]) -> ScsiResponse {
    let rctd = cdb[2] & 0x80 != 0;
    let option = cdb[2] & 0x07;
    let opcode = cdb[3];
    let sa = be16(cdb, 4);
    let alloc = be32(cdb, 6) as usize;
    let mut d = Vec::new();
    match option {
        0 => {
            d.extend_from_slice(&[0; 4]);
            for (o, s, usage) in SUPPORTED {
                d.push(*o);
                d.push(0);
                d.extend_from_slice(&s.unwrap_or(0).to_be_bytes());
                d.push(0);
                d.push(if rctd { 0x02 } else { 0 } | u8::from(s.is_some()));
                d.extend_from_slice(&(usage.len() as u16).to_be_bytes());
                if rctd {
                    d.extend_from_slice(&TIMEOUTS);
                }
            }
            let n = (d.len() - 4) as u32;
            d[0..4].copy_from_slice(&n.to_be_bytes());
        }
        1 | 2 => {
            let has_sa = SUPPORTED
                .iter()
                .any(|(o, s, _)| *o == opcode && s.is_some());
            if (option == 1) == has_sa {
                return invalid_cdb(if option == 1 { 3 } else { 4 });
            }
            let found = SUPPORTED
                .iter()
                .find(|(o, s, _)| *o == opcode && (option == 1 || *s == Some(sa)));
            match found {
                Some((_, _, usage)) => {
                    d.push(0);
                    d.push(if rctd { 0x80 } else { 0 } | 0x03);
                    d.extend_from_slice(&(usage.len() as u16).to_be_bytes());
                    d.extend_from_slice(usage);
                    if rctd {
                        d.extend_from_slice(&TIMEOUTS);
                    }
                }
                None => d.extend_from_slice(&[0, 0x01, 0, 0]),
            }
        }
        _ => return invalid_cdb(2),
    }
    d.truncate(alloc);
    ScsiResponse::good(d)
}

/// Checks a CDB's length for its operation code and its CONTROL byte (NACA is not supported,
/// LINK is obsolete): the operation code, or the CHECK CONDITION.
fn check_cdb(cdb: &[u8]) -> Result<u8, ScsiResponse> {
    let Some(&opcode) = cdb.first() else {
        return Err(invalid_opcode());
    };
    let Some(len) = cdb_len(opcode) else {
        return Err(invalid_opcode());
    };
    if cdb.len() < len {
        return Err(invalid_cdb(0));
    }
    if cdb[len - 1] & 0x05 != 0 {
        return Err(invalid_cdb(len as u16 - 1));
    }
    Ok(opcode)
}

/// Whether `opcode` is a READ or WRITE (6, 10, 12 or 16), which [`Lun::execute_batch`] sends
/// to the stack together.
fn is_read_or_write(opcode: u8) -> bool {
    matches!(
        opcode,
        op::READ_6
            | op::READ_10
            | op::READ_12
            | op::READ_16
            | op::WRITE_6
            | op::WRITE_10
            | op::WRITE_12
            | op::WRITE_16
    )
}

/// What a READ or WRITE moves, checked against the LUN.
struct Io {
    offset: u64,
    len: usize,
    fua: bool,
}

/// A READ or WRITE CDB.
struct Rw {
    lba: u64,
    blocks: u32,
    fua: bool,
}

fn parse_rw(cdb: &[u8]) -> Result<Rw, ScsiResponse> {
    let op = cdb[0];
    if op == op::READ_6 || op == op::WRITE_6 {
        let lba = u64::from(u32::from_be_bytes([0, cdb[1] & 0x1f, cdb[2], cdb[3]]));
        let blocks = if cdb[4] == 0 { 256 } else { u32::from(cdb[4]) };
        return Ok(Rw {
            lba,
            blocks,
            fua: false,
        });
    }
    if cdb[1] & 0xe0 != 0 {
        return Err(invalid_cdb(1)); // RDPROTECT/WRPROTECT: no protection information
    }
    let fua = cdb[1] & 0x08 != 0;
    let (lba, blocks) = match cdb_len(op) {
        Some(10) => (u64::from(be32(cdb, 2)), u32::from(be16(cdb, 7))),
        Some(12) => (u64::from(be32(cdb, 2)), be32(cdb, 6)),
        _ => (be64(cdb, 2), be32(cdb, 10)),
    };
    Ok(Rw { lba, blocks, fua })
}

/// [`Lun::data_dir`] for logical blocks of `bs` bytes.
fn data_dir_bs(cdb: &[u8], bs: u32) -> Result<DataDir, ScsiResponse> {
    let Some(&opcode) = cdb.first() else {
        return Err(invalid_opcode());
    };
    let Some(len) = cdb_len(opcode) else {
        return Err(invalid_opcode());
    };
    if cdb.len() < len {
        return Err(invalid_cdb(0));
    }
    let out = |bytes: u64| -> Result<DataDir, ScsiResponse> {
        u32::try_from(bytes)
            .map(DataDir::Out)
            .map_err(|_| invalid_cdb(0))
    };
    let bs = u64::from(bs);
    Ok(match opcode {
        op::TEST_UNIT_READY
        | op::SYNCHRONIZE_CACHE_10
        | op::SYNCHRONIZE_CACHE_16
        | op::PRE_FETCH_10
        | op::PRE_FETCH_16 => DataDir::None,
        op::REQUEST_SENSE
        | op::INQUIRY
        | op::MODE_SENSE_6
        | op::MODE_SENSE_10
        | op::READ_CAPACITY_10
        | op::READ_6
        | op::READ_10
        | op::READ_12
        | op::READ_16
        | op::SERVICE_ACTION_IN_16
        | op::REPORT_LUNS
        | op::PERSISTENT_RESERVE_IN
        | op::MAINTENANCE_IN => DataDir::In,
        op::WRITE_6 => out(if cdb[4] == 0 { 256 } else { u64::from(cdb[4]) } * bs)?,
        op::WRITE_10 => out(u64::from(be16(cdb, 7)) * bs)?,
        op::WRITE_12 => out(u64::from(be32(cdb, 6)) * bs)?,
        op::WRITE_16 => out(u64::from(be32(cdb, 10)) * bs)?,
        op::WRITE_AND_VERIFY_10 | op::WRITE_AND_VERIFY_12 | op::WRITE_AND_VERIFY_16 => {
            let blocks = parse_rw(cdb).map_or(0, |rw| rw.blocks);
            out(u64::from(blocks) * bs)?
        }
        op::VERIFY_10 | op::VERIFY_12 | op::VERIFY_16 => {
            let blocks = parse_rw(cdb).map_or(0, |rw| rw.blocks);
            match (cdb[1] >> 1) & 3 {
                0 => DataDir::None,
                1 => out(u64::from(blocks) * bs)?,
                3 => out(bs)?,
                _ => return Err(invalid_cdb(1)),
            }
        }
        op::WRITE_SAME_10 => out(bs)?,
        op::WRITE_SAME_16 => {
            if cdb[1] & 0x01 != 0 {
                DataDir::None
            } else {
                out(bs)?
            }
        }
        op::COMPARE_AND_WRITE => out(2 * u64::from(cdb[13]) * bs)?,
        op::UNMAP => out(u64::from(be16(cdb, 7)))?,
        op::PERSISTENT_RESERVE_OUT => out(u64::from(be32(cdb, 5)))?,
        _ => return Err(invalid_opcode()),
    })
}

#[cfg(test)]
mod tests;
