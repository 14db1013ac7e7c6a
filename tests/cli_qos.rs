//! End-to-end tests of `vstor qos`, run as a user would run it.

mod common;

use common::{fails, ok, s};
use std::path::{Path, PathBuf};

fn disk(dir: &Path, name: &str) -> PathBuf {
    let p = dir.join(name);
    ok(&["disk", "create", s(&p), "--size", "16M"]);
    p
}

fn json(args: &[&str]) -> serde_json::Value {
    serde_json::from_str(&ok(args)).expect("JSON output")
}

#[test]
fn a_capped_flow_is_held_to_its_maximum_and_reported() {
    let dir = tempfile::tempdir().unwrap();
    let a = disk(dir.path(), "a.raw");
    let flow = format!("{},max=200,burst=1,name=capped", s(&a));
    let v = json(&[
        "qos",
        "run",
        "--flow",
        &flow,
        "--seconds",
        "1",
        "-d",
        "4",
        "--json",
    ]);
    assert_eq!(v["qos"], true);
    let f = &v["flows"][0];
    assert_eq!(f["name"], "capped");
    assert_eq!(f["max_iops"], 200);
    assert_eq!(f["status"], "Ok");
    let seconds = f["seconds"].as_f64().unwrap();
    let units = f["units"].as_u64().unwrap();
    assert!(seconds >= 1.0, "{seconds}");
    // The cap is an upper bound whatever the machine's load: burst + 200 per second.
    assert!(
        units as f64 <= 1.0 + 200.0 * seconds + 1.0,
        "{units} in {seconds} s"
    );
    // And a lower one: a 4 KiB read from the page cache takes far less than 5 ms.
    assert!(units >= 100, "{units} in {seconds} s");
    let ratio = f["achieved_over_max"].as_f64().unwrap();
    assert!((ratio - f["normalized_iops"].as_f64().unwrap() / 200.0).abs() < 1e-9);
}

#[test]
fn sizes_are_normalized_to_8k_units() {
    let dir = tempfile::tempdir().unwrap();
    let a = disk(dir.path(), "a.raw");
    let flow = format!("{},max=800", s(&a));
    let v = json(&[
        "qos",
        "run",
        "--flow",
        &flow,
        "--seconds",
        "0.5",
        "-s",
        "20k",
        "-d",
        "2",
        "--rw",
        "randwrite",
        "--json",
    ]);
    let f = &v["flows"][0];
    // 20 KiB costs 3 units.
    assert_eq!(
        f["units"].as_u64().unwrap(),
        3 * f["requests"].as_u64().unwrap()
    );
    let v = json(&[
        "qos",
        "run",
        "--flow",
        &flow,
        "--seconds",
        "0.2",
        "-s",
        "20k",
        "--unit",
        "4k",
        "--json",
    ]);
    let f = &v["flows"][0];
    assert_eq!(
        f["units"].as_u64().unwrap(),
        5 * f["requests"].as_u64().unwrap()
    );
}

#[test]
fn the_table_names_every_flow_and_groups_share_their_maximum() {
    let dir = tempfile::tempdir().unwrap();
    let a = disk(dir.path(), "a.raw");
    let b = disk(dir.path(), "b.raw");
    let out = ok(&[
        "qos",
        "run",
        "--flow",
        &format!("{},group=tenant,name=web", s(&a)),
        "--flow",
        &format!("{},group=tenant,name=db", s(&b)),
        "--flow",
        &format!("{},min=100,weight=300,name=gold", s(&b)),
        "--group",
        "tenant,max=300,burst=1",
        "--seconds",
        "1",
        "-d",
        "4",
        "--rw",
        "mixed",
    ]);
    let lines: Vec<&str> = out.lines().collect();
    assert!(lines[0].starts_with("QoS for 1.0 s"), "{out}");
    assert!(lines[1].split_whitespace().eq([
        "Flow",
        "Target",
        "Min",
        "Max",
        "Weight",
        "Status",
        "NormIOPS",
        "IOPS",
        "MiB/s",
        "AvgLat(us)",
        "P99Lat(us)",
        "Max%"
    ]));
    for name in ["web", "db", "gold"] {
        assert!(
            lines
                .iter()
                .any(|l| l.starts_with(name) && l.contains(" Ok ")),
            "{name}: {out}"
        );
    }
    // The group's two flows together stay under its 300 (plus one request each).
    let total: f64 = lines[2..4]
        .iter()
        .map(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            cols[6].parse::<f64>().unwrap()
        })
        .sum();
    assert!(total <= 300.0 * 1.05 + 2.0, "{out}");
}

#[test]
fn bypass_runs_the_same_work_without_the_layer() {
    let dir = tempfile::tempdir().unwrap();
    let a = disk(dir.path(), "a.raw");
    let flow = format!("{},max=100", s(&a));
    let v = json(&[
        "qos",
        "run",
        "--flow",
        &flow,
        "--seconds",
        "0.3",
        "--bypass",
        "--json",
    ]);
    assert_eq!(v["qos"], false);
    let f = &v["flows"][0];
    assert_eq!(f["status"], "Bypassed");
    // Without the layer the cap does not apply: far more than 100 a second.
    assert!(f["normalized_iops"].as_f64().unwrap() > 1000.0, "{f}");
}

#[test]
fn bad_runs_fail_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let a = disk(dir.path(), "a.raw");
    let t = s(&a);
    for (args, want) in [
        (
            vec!["--flow", &format!("{t},max=5,min=9")],
            "above the maximum",
        ),
        (vec!["--flow", &format!("{t},max=x")], "max=x"),
        (
            vec!["--flow", &format!("{t},bogus=1")],
            "unknown option 'bogus'",
        ),
        (vec!["--flow", &format!("{t},group=nope")], "group 'nope'"),
        (vec!["--flow", t, "--seconds", "0"], "--seconds"),
        (vec!["--flow", t, "-s", "1000"], "--size"),
        (vec!["--flow", "/nonexistent/x.raw"], "/nonexistent/x.raw"),
        (vec!["--flow", t, "--unit", "100"], "512-byte minimum"),
    ] {
        let mut full = vec!["qos", "run"];
        full.extend(args.iter().map(|s| &**s));
        let err = fails(&full);
        assert!(err.contains(want), "{full:?}: {err}");
    }
}

#[test]
fn help_shows_an_example() {
    let out = ok(&["qos", "run", "--help"]);
    assert!(
        out.contains("vstor qos run --flow d.raw,max=1000 --seconds 10"),
        "{out}"
    );
}
