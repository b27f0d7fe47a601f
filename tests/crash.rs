//! Crash recovery on the bed (real mosquitto, dockerd, CRIU, real `ferry
//! agent` processes): an agent SIGKILLed in the middle of a migration and
//! started again with the same state dir drives the journaled job to a final
//! state. The agent is stopped at a known phase by its test hook
//! `FERRY_TEST_PAUSE_AT=<role>:<phase>` (inert unless set; see
//! `migration::journal::test_pause`), killed by pid, then restarted without
//! the hook. Each case checks what a user sees: the counter runs on exactly
//! one node and counts on, the job's final status names the restart, and
//! the other node holds nothing of the job.

use std::process::Command;
use std::time::Duration;

use ferry_tests::fleet::{Agent, AgentOptions, DevFleet};
use ferry_tests::{counter_values, parse_counter, wait_for, Bed, Container};
use serde_json::Value;

const REPLY_TIMEOUT: Duration = Duration::from_secs(20);
/// The bound: final and clean within 60 s of the restart.
const RECOVERY: Duration = Duration::from_secs(60);

fn sigkill(agent: Agent) {
    let pid = agent.pid().to_string();
    let killed = Command::new("kill").args(["-KILL", &pid]).status();
    assert!(matches!(killed, Ok(s) if s.success()), "kill -KILL {pid}");
    // Drop reaps the child (already dead: no SIGTERM reaches anything).
    drop(agent);
}

fn paused(fleet: &DevFleet, n: usize, at: &str) -> Agent {
    let env = format!("FERRY_TEST_PAUSE_AT={at}");
    fleet.start_agent_with(
        n,
        AgentOptions {
            wrapper: &["env", &env],
            ..AgentOptions::default()
        },
    )
}

fn wait_paused(agent: &Agent, at: &str) {
    wait_for(
        &format!("{} paused at {at}", agent.node),
        Duration::from_secs(120),
        || {
            if agent.log_text().contains("test pause") {
                Ok(())
            } else {
                Err("not yet".to_string())
            }
        },
    );
}

/// Where the counter runs now: node numbers.
fn running_on(fleet: &DevFleet, name: &str) -> Vec<usize> {
    (1..=2)
        .filter(|&n| fleet.node(n).exists(name) && fleet.node(n).is_running(name))
        .collect()
}

struct Case {
    fault: &'static str,
    /// Which agent pauses and is killed (1 source, 2 target).
    killed: usize,
    at: &'static str,
    /// Where the counter must run in the end.
    ends_on: usize,
    /// The killed side's final state.
    state: &'static str,
}

fn run_case(fleet: &DevFleet, case: &Case) -> String {
    // The paused agent, and the other one (kept running throughout).
    let (victim, _other) = if case.killed == 1 {
        (paused(fleet, 1, case.at), fleet.start_agent(2))
    } else {
        let other = fleet.start_agent(1);
        (paused(fleet, 2, case.at), other)
    };
    let counter: Container = fleet.start_counter(1);
    let name = counter.name.clone();
    let before_kill = counter_values(&fleet.node(1).logs(&name));
    let job = fleet.send_migrate(&counter, 2, None);
    wait_paused(&victim, case.at);
    sigkill(victim);
    let _restarted = fleet.start_agent(case.killed);
    let killed_node = &fleet.node(case.killed).name;
    let status: Value = fleet.final_status(killed_node, &job, RECOVERY);
    assert_eq!(status["state"], case.state, "{}: {status}", case.fault);
    let error = status["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("agent restarted") || case.state == "succeeded",
        "{}: the reason names the restart: {status}",
        case.fault
    );
    // Exactly one copy, on the expected node, counting on.
    let other = 3 - case.ends_on;
    wait_for(&format!("{}: one copy", case.fault), RECOVERY, || {
        let on = running_on(fleet, &name);
        let gone = !fleet.node(other).exists(&name);
        if on == vec![case.ends_on] && gone {
            Ok(())
        } else {
            Err(format!(
                "running on {on:?}, on node {other}: exists={}",
                !gone
            ))
        }
    });
    let last = *before_kill.last().unwrap_or(&0);
    wait_for(
        &format!("{}: counter goes on", case.fault),
        REPLY_TIMEOUT,
        || {
            let now = parse_counter(&fleet.node(case.ends_on).logs(&name))?;
            match now.last() {
                Some(&v) if v > last => Ok(()),
                other => Err(format!("counter at {other:?}, was {last}")),
            }
        },
    );
    // Nothing of the job left in either journal, nor in staging.
    for n in 1..=2 {
        let state = fleet.state_dir(n);
        let staging = state
            .with_file_name(format!("{}-work", fleet.node(n).name))
            .join("staging")
            .join(&job);
        wait_for(
            &format!("{}: staging of node {n} gone", case.fault),
            RECOVERY,
            || {
                if staging.exists() {
                    Err(format!("{} exists", staging.display()))
                } else {
                    Ok(())
                }
            },
        );
        let dir = fleet.state_dir(n).join("journal");
        let left: Vec<_> = std::fs::read_dir(&dir)
            .map(|d| d.filter_map(Result::ok).map(|e| e.file_name()).collect())
            .unwrap_or_default();
        assert!(
            !left.iter().any(|f| f.to_string_lossy().contains(&job)),
            "{}: journal of node {n} still holds {left:?}",
            case.fault
        );
    }
    format!(
        "{:<28} {:<26} -> {} on node {}, killed side {}",
        case.fault, case.at, "one copy", case.ends_on, status["state"]
    )
}

#[test]
fn a_killed_agent_restarted_finishes_its_job_with_one_copy() {
    let fleet = DevFleet::new(Bed::require());
    let cases = [
        Case {
            fault: "SIGKILL source",
            killed: 1,
            at: "source:started",
            ends_on: 1,
            state: "rolled_back",
        },
        Case {
            fault: "SIGKILL target",
            killed: 2,
            at: "target:creating",
            ends_on: 1,
            state: "failed",
        },
        Case {
            fault: "SIGKILL source",
            killed: 1,
            at: "source:checkpointing",
            ends_on: 1,
            state: "rolled_back",
        },
        Case {
            fault: "SIGKILL source",
            killed: 1,
            at: "source:restore_requested",
            ends_on: 2,
            state: "succeeded",
        },
        Case {
            fault: "SIGKILL target",
            killed: 2,
            at: "target:receiving",
            ends_on: 1,
            state: "failed",
        },
        Case {
            fault: "SIGKILL source",
            killed: 1,
            at: "source:transferring",
            ends_on: 1,
            state: "rolled_back",
        },
        Case {
            fault: "SIGKILL source",
            killed: 1,
            at: "source:commit",
            ends_on: 2,
            state: "succeeded",
        },
        Case {
            fault: "SIGKILL target",
            killed: 2,
            at: "target:restoring",
            ends_on: 1,
            state: "failed",
        },
        Case {
            fault: "SIGKILL target",
            killed: 2,
            at: "target:restored",
            ends_on: 1,
            state: "failed",
        },
    ];
    let mut table = Vec::new();
    for case in &cases {
        table.push(run_case(&fleet, case));
    }
    println!("fault x phase -> outcome");
    for row in table {
        println!("{row}");
    }
}
