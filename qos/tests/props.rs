//! Property tests of the scheduler's invariants over random flows, policies, devices and
//! activity, on virtual time.

mod sim;

use proptest::prelude::*;
use sim::{Sim, NS};
use vstor_qos::{FlowId, Limits, PolicyKind, QosConfig};

#[derive(Debug, Clone)]
struct FlowPlan {
    min: u64,
    max: u64,
    burst: u64,
    weight: u64,
    depth: usize,
    kib: u64,
    /// Index of a shared (aggregated) group, if any.
    group: Option<usize>,
}

fn flow_plan() -> impl Strategy<Value = FlowPlan> {
    (
        prop_oneof![Just(0u64), 1u64..3000],
        prop_oneof![Just(0u64), 50u64..5000],
        prop_oneof![Just(0u64), 1u64..300],
        0u64..500,
        1usize..24,
        prop_oneof![Just(4u64), Just(8), Just(12), Just(64), Just(1024)],
        prop_oneof![3 => Just(None), 1 => (0usize..2).prop_map(Some)],
    )
        .prop_map(|(min, max, burst, weight, depth, kib, group)| FlowPlan {
            min: if max > 0 { min.min(max) } else { min },
            max,
            burst,
            weight,
            depth,
            kib,
            group,
        })
}

/// Checks that the dispatches (time, units) never exceed `burst + rate * T + largest` over any
/// interval: max over j of (D_j - r t_j) - min over i <= j of (D_{i-1} - r t_i).
fn conforms(d: &[(u64, u64)], rate: u64, burst: u64) -> Result<(), String> {
    let largest = d.iter().map(|x| x.1).max().unwrap_or(0);
    let allowed = (burst + largest) as f64 + 1e-6;
    let mut before = 0f64; // D_{i-1}
    let mut min_start = f64::MAX;
    for &(t, u) in d {
        let tr = rate as f64 * t as f64 / NS as f64;
        min_start = min_start.min(before - tr);
        before += u as f64;
        let excess = (before - tr) - min_start;
        if excess > allowed {
            return Err(format!(
                "{excess} units above the rate at {t} ns (allowed {allowed})"
            ));
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, .. ProptestConfig::default() })]

    #[test]
    fn invariants_hold(
        plans in proptest::collection::vec(flow_plan(), 1..7),
        group_limits in proptest::collection::vec((0u64..2000, 100u64..4000), 2),
        capacity in 500u64..50_000,
        max_in_flight in 0usize..8,
        toggles in proptest::collection::vec((0usize..7, 1u64..40), 0..6),
    ) {
        let mut sim = Sim::new(
            QosConfig { max_in_flight, ..Default::default() },
            capacity,
        );
        let groups: Vec<_> = group_limits
            .iter()
            .enumerate()
            .map(|(i, &(min, max))| {
                let l = Limits { min_iops: min.min(max), max_iops: max, ..Default::default() };
                sim.s.add_policy(&format!("g{i}"), PolicyKind::Aggregated, l).unwrap()
            })
            .collect();
        let mut flows: Vec<FlowId> = Vec::new();
        for (i, p) in plans.iter().enumerate() {
            let policy = match p.group {
                Some(g) => groups[g],
                None => {
                    let l = Limits { min_iops: p.min, max_iops: p.max, burst: p.burst, max_bandwidth: 0 };
                    sim.s.add_policy(&format!("p{i}"), PolicyKind::Dedicated, l).unwrap()
                }
            };
            let f = sim.s.add_flow(&format!("f{i}"), Some(policy), p.weight).unwrap();
            sim.load(f, p.depth, p.kib << 10);
            flows.push(f);
        }
        // Run in steps of 100 ms, switching flows on and off.
        let mut t = 0;
        for (k, ms) in toggles {
            t += ms * 25_000_000;
            sim.run_until(t);
            if let Some(l) = sim.loads.get_mut(k) {
                l.active = !l.active;
            }
        }
        sim.run_until(t + 2 * NS);
        sim.drain();

        // The device never has more in flight than allowed.
        if max_in_flight > 0 {
            prop_assert!(sim.max_in_flight_seen <= max_in_flight);
        }
        for (i, l) in sim.loads.iter().enumerate() {
            // Every request queued was let go exactly once, in the order it was queued.
            let tokens: Vec<u64> = l.dispatches.iter().map(|d| d.2).collect();
            let expect: Vec<u64> = (0..tokens.len() as u64).collect();
            prop_assert_eq!(&tokens, &expect, "flow {}", i);
            prop_assert_eq!(l.completions.len(), l.dispatches.len());
            let st = sim.s.flow_stats(flows[i], sim.now).unwrap();
            prop_assert_eq!(st.requests as usize, l.dispatches.len());
            prop_assert_eq!((st.queued, st.in_flight), (0, 0));
            // A dedicated maximum holds over every interval.
            let p = &plans[i];
            if p.group.is_none() && p.max > 0 {
                let d: Vec<(u64, u64)> = l.dispatches.iter().map(|d| (d.0, d.1)).collect();
                let burst = Limits { max_iops: p.max, burst: p.burst, ..Default::default() }.effective_burst();
                if let Err(e) = conforms(&d, p.max, burst) {
                    return Err(TestCaseError::fail(format!("flow {i}: {e}")));
                }
            }
        }
        // An aggregated maximum holds for the group's sum (a shared bucket lets a request go
        // once it is out of debt, so one request per member may be above it).
        for (g, &(min, max)) in group_limits.iter().enumerate() {
            let _ = min;
            let members: Vec<usize> = (0..plans.len()).filter(|&i| plans[i].group == Some(g)).collect();
            if members.is_empty() {
                continue;
            }
            let mut d: Vec<(u64, u64)> = members
                .iter()
                .flat_map(|&i| sim.loads[i].dispatches.iter().map(|d| (d.0, d.1)))
                .collect();
            d.sort();
            let largest: u64 = members.iter().map(|&i| sim.loads[i].cost.units).sum();
            if let Err(e) = conforms(&d, max, Limits::max(max).effective_burst() + largest) {
                return Err(TestCaseError::fail(format!("group {g}: {e}")));
            }
        }
    }

    #[test]
    fn busy_flows_without_limits_share_by_weight(
        weights in proptest::collection::vec(1u64..1000, 2..6),
        capacity in 1000u64..20_000,
    ) {
        let mut sim = Sim::new(QosConfig { max_in_flight: 2, ..Default::default() }, capacity);
        for (i, &w) in weights.iter().enumerate() {
            let f = sim.s.add_flow(&format!("f{i}"), None, w).unwrap();
            sim.load(f, 8, 8192);
        }
        sim.run_until(12 * NS);
        let u = sim.units_between(2 * NS, 12 * NS);
        let total: u64 = u.iter().sum();
        let wsum: u64 = weights.iter().sum();
        // Work conserving: the device stays busy.
        prop_assert!(total as f64 >= capacity as f64 * 10.0 * 0.99, "{total}");
        for (i, &w) in weights.iter().enumerate() {
            let want = total as f64 * w as f64 / wsum as f64;
            // Within 2% of the share, or two requests for tiny shares.
            prop_assert!((u[i] as f64 - want).abs() <= (want * 0.02).max(2.0), "flow {i}: {} vs {want}", u[i]);
        }
    }

    #[test]
    fn minimums_that_fit_are_met(
        mins in proptest::collection::vec(0u64..3000, 1..5),
        weights in proptest::collection::vec(1u64..1000, 5),
    ) {
        let capacity = 10_000u64;
        prop_assume!(mins.iter().sum::<u64>() <= capacity * 9 / 10);
        let mut sim = Sim::new(QosConfig { max_in_flight: 4, ..Default::default() }, capacity);
        for (i, &m) in mins.iter().enumerate() {
            let p = sim.s.add_policy(&format!("p{i}"), PolicyKind::Dedicated, Limits::min(m)).unwrap();
            let f = sim.s.add_flow(&format!("f{i}"), Some(p), weights[i]).unwrap();
            sim.load(f, 16, 4096);
        }
        // A heavy flow with no minimum competes with them all.
        let hog = sim.s.add_flow("hog", None, 1000).unwrap();
        sim.load(hog, 64, 4096);
        sim.run_until(6 * NS);
        let u = sim.units_between(NS, 6 * NS);
        for (i, &m) in mins.iter().enumerate() {
            prop_assert!(u[i] as f64 >= m as f64 * 5.0 * 0.98, "flow {i}: {} for a minimum of {m}", u[i]);
        }
        prop_assert!(sim.events.is_empty(), "{:?}", sim.events);
    }
}
