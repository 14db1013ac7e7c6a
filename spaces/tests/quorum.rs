//! The metadata quorum: members written apart (a split brain) are never both taken as
//! current. An open that sees them refuses, naming the members and their sequence numbers;
//! `force_member` keeps one side and takes the other as failed.

mod common;

use common::*;
use vstor_core::BlockDevice;
use vstor_spaces::{MemberState, OpenOptions, Pool, Resiliency, SpaceHealth, SpacesError};

const DISK: u64 = 16 << 20;
const SPACE: u64 = 2 << 20;

fn split_brain(e: &vstor_core::Error) -> Option<String> {
    match e {
        vstor_core::Error::Layer(l) => match l.downcast_ref::<SpacesError>() {
            Some(SpacesError::SplitBrain { detail }) => Some(detail.clone()),
            _ => None,
        },
        _ => None,
    }
}

/// Writes `data` at 0 of space "s" of a pool opened with the members `skip` missing.
fn write_without(devs: &[std::sync::Arc<dyn BlockDevice>], skip: &[usize], data: &[u8]) {
    let pool = open(devs, skip, false);
    let s = pool.open_space("s").unwrap();
    s.write_at(0, data).unwrap();
    s.flush().unwrap();
}

#[test]
fn members_written_apart_are_refused_then_one_side_is_kept() {
    let devs = mem_disks(2, DISK);
    let pool = create(&devs);
    pool.create_space(&spec("s", SPACE, Resiliency::Mirror { copies: 2 }, Some(1)))
        .unwrap();
    let base = pattern(1, SPACE as usize);
    pool.open_space("s").unwrap().write_at(0, &base).unwrap();
    drop(pool);
    // A member that only missed writes is stale, not diverged: the open takes the newer side.
    let a_side = pattern(2, 65536);
    write_without(&devs, &[1], &a_side);
    let pool = open(&devs, &[], true);
    assert_eq!(pool.info().members[1].state, MemberState::Failed);
    drop(pool);
    // Now member 1 alone (it never learnt it failed) takes writes of its own.
    let b_side = pattern(3, 65536);
    write_without(&devs, &[0], &b_side);
    for read_only in [false, true] {
        let e = Pool::open(
            named(&devs),
            &OpenOptions {
                read_only,
                ..Default::default()
            },
        )
        .unwrap_err();
        let detail = split_brain(&e).unwrap_or_else(|| panic!("not a split brain: {e}"));
        assert!(
            detail.contains("m0") && detail.contains("m1") && detail.contains("sequence"),
            "{detail}"
        );
    }
    // Nothing was written by the refused opens: still refused.
    assert!(split_brain(&Pool::open(named(&devs), &OpenOptions::default()).unwrap_err()).is_some());
    // Keep member 0's side.
    let pool = Pool::open(
        named(&devs),
        &OpenOptions {
            force_member: Some("m0".into()),
            ..Default::default()
        },
    )
    .unwrap();
    let info = pool.info();
    assert_eq!(
        info.members[1].state,
        MemberState::Failed,
        "{:?}",
        info.notes
    );
    assert!(
        info.notes.iter().any(|n| n.contains("force_member")),
        "{:?}",
        info.notes
    );
    let mut want = base.clone();
    want[..65536].copy_from_slice(&a_side);
    let space = pool.open_space("s").unwrap();
    assert!(read_all(&space) == want);
    drop((space, pool));
    // The next open agrees without forcing; member 1 comes back as a fresh member.
    let pool = open(&devs, &[], false);
    assert_eq!(pool.info().members[1].state, MemberState::Failed);
    let fresh = pool.reuse_member(1).unwrap();
    pool.repair(None, &mut |_, _| {}).unwrap();
    pool.remove_member(1).unwrap();
    let space = pool.open_space("s").unwrap();
    assert_eq!(space.health(), SpaceHealth::Healthy);
    assert!(read_all(&space) == want);
    drop((space, pool));
    // Either disk alone now gives member 0's side.
    for alone in [0, 1] {
        let pool = open(&devs, &[1 - alone], true);
        assert!(
            read_all(&pool.open_space("s").unwrap()) == want,
            "disk {alone}, member {fresh}"
        );
    }
}

#[test]
fn keeping_the_other_side_works_too() {
    let devs = mem_disks(2, DISK);
    let pool = create(&devs);
    pool.create_space(&spec("s", SPACE, Resiliency::Mirror { copies: 2 }, Some(1)))
        .unwrap();
    // Allocated while both members are there (a thin extent needs both).
    pool.open_space("s")
        .unwrap()
        .write_at(0, &[1u8; 8192])
        .unwrap();
    drop(pool);
    let a_side = pattern(4, 8192);
    let b_side = pattern(5, 8192);
    write_without(&devs, &[1], &a_side);
    write_without(&devs, &[0], &b_side);
    let pool = Pool::open(
        named(&devs),
        &OpenOptions {
            force_member: Some("m1".into()),
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(pool.info().members[0].state, MemberState::Failed);
    let mut got = vec![0u8; 8192];
    pool.open_space("s").unwrap().read_at(0, &mut got).unwrap();
    assert!(got == b_side);
    drop(pool);
    let pool = open(&devs, &[], true);
    assert_eq!(pool.info().members[0].state, MemberState::Failed);
    // An unknown disk name is refused.
    let e = Pool::open(
        named(&devs),
        &OpenOptions {
            force_member: Some("nope".into()),
            ..Default::default()
        },
    )
    .unwrap_err();
    assert!(e.to_string().contains("nope"), "{e}");
}

/// Two sides that only changed metadata (a space created on each while the other was
/// missing) hold different metadata of one sequence: refused as well.
#[test]
fn different_metadata_of_one_sequence_is_a_split_brain() {
    let devs = mem_disks(3, DISK);
    drop(create(&devs));
    for (skip, name) in [([1usize, 2], "x"), ([0, 2], "y")] {
        let pool = open(&devs, &skip, false);
        pool.create_space(&spec(name, SPACE, Resiliency::Simple, Some(1)))
            .unwrap();
    }
    let e = Pool::open(without(&devs, &[2]), &OpenOptions::default()).unwrap_err();
    let detail = split_brain(&e).unwrap_or_else(|| panic!("not a split brain: {e}"));
    assert!(detail.contains("same sequence"), "{detail}");
    // With member 2 (which saw neither) the pool still diverged.
    assert!(split_brain(&Pool::open(named(&devs), &OpenOptions::default()).unwrap_err()).is_some());
}
