//! Docker + CRIU on the bed, before any agent code depends on them: a
//! container checkpointed on node1 through the Engine API and restored on
//! node2 (daemon to daemon, as FACTS.md describes) continues where it stopped.
//!
//! Needs the bed: `tests/bed/bed up 2`, or `tests/run` for everything.

use std::time::{Duration, Instant};

use ferry_tests::{
    check_counter_resumed, copy_dir, parse_counter, parse_memhog, unique_name, wait_for, Bed,
    Container, Node, COUNTER_IMAGE, MEMHOG_IMAGE,
};

const CHECKPOINT: &str = "ferry-cp";

/// Checkpoints `src` on its node, copies the image folder into a new
/// container of the same image on `target` and starts that from it. Returns
/// the restored container; `src` is stopped with its log complete.
fn migrate(src: &Container, target: &Node, image: &str, args: &[&str]) -> Container {
    let node = &src.node;
    let t0 = Instant::now();
    node.checkpoint(&src.id, CHECKPOINT);
    let checkpointed = t0.elapsed();
    // The log is complete once Docker has seen the process go: it drains
    // the container's output before marking it stopped.
    wait_for(
        &format!(
            "{} to show {} stopped after the checkpoint",
            node.name, src.name
        ),
        Duration::from_secs(20),
        || {
            if src.is_running() {
                Err("still running".to_string())
            } else {
                Ok(())
            }
        },
    );
    let dst = target.create(&src.name, image, args);
    let from = node.checkpoint_dir(&src.id, CHECKPOINT);
    let to = target.checkpoint_dir(&dst.id, CHECKPOINT);
    copy_dir(&from, &to).unwrap_or_else(|e| {
        panic!(
            "copying checkpoint {} to {}: {e}",
            from.display(),
            to.display()
        )
    });
    let t1 = Instant::now();
    target.start_from_checkpoint(&dst.id, CHECKPOINT);
    eprintln!(
        "{}: checkpoint on {} took {:.2} s, restore on {} {:.2} s",
        src.name,
        node.name,
        checkpointed.as_secs_f64(),
        target.name,
        t1.elapsed().as_secs_f64()
    );
    dst
}

#[test]
fn counter_resumes_on_another_node() {
    let bed = Bed::require();
    let (a, b) = (bed.node(1), bed.node(2));
    let name = unique_name("counter");

    let src = a.run(&name, COUNTER_IMAGE, &[]);
    wait_for(
        &format!("{name} on {} to print 5 values", a.name),
        Duration::from_secs(30),
        || {
            let values = parse_counter(&src.logs())?;
            match values.len() {
                n if n >= 5 => Ok(()),
                n => Err(format!("{n} so far")),
            }
        },
    );

    let dst = migrate(&src, b, COUNTER_IMAGE, &[]);
    let before = parse_counter(&src.logs()).unwrap_or_else(|e| panic!("{}: {e}", a.name));
    let after = wait_for(
        &format!("{name} on {} to print 5 values", b.name),
        Duration::from_secs(30),
        || {
            let values = parse_counter(&dst.logs())?;
            match values.len() {
                n if n >= 5 => Ok(values),
                n => Err(format!(
                    "{n} so far, container running: {}",
                    dst.is_running()
                )),
            }
        },
    );
    check_counter_resumed(&before, &after, 5).unwrap_or_else(|e| panic!("{e}"));
    eprintln!(
        "{} printed 0..={}, {} went on with {:?}",
        a.name,
        before.last().copied().unwrap_or_default(),
        b.name,
        after
    );
}

#[test]
fn memhog_keeps_its_memory_on_another_node() {
    const MIB: &str = "64";
    let bed = Bed::require();
    let (a, b) = (bed.node(1), bed.node(2));
    let name = unique_name("memhog");

    let src = a.run(&name, MEMHOG_IMAGE, &[MIB]);
    wait_for(
        &format!("{name} on {} to fill {MIB} MiB and verify it once", a.name),
        Duration::from_secs(60),
        || {
            let log = parse_memhog(&src.logs())?;
            match (&log.ready, log.ticks.len()) {
                (Some(_), n) if n >= 1 => Ok(()),
                _ => Err(format!("{log:?}")),
            }
        },
    );

    let dst = migrate(&src, b, MEMHOG_IMAGE, &[MIB]);
    let before = parse_memhog(&src.logs()).unwrap_or_else(|e| panic!("{}: {e}", a.name));
    let (mib, checksum) = before.ready.clone().expect("memhog printed its ready line");
    assert_eq!(mib.to_string(), MIB);
    let last_tick = before
        .ticks
        .last()
        .expect("memhog ticked before the checkpoint")
        .0;

    let after = wait_for(
        &format!("{name} on {} to verify its memory twice", b.name),
        Duration::from_secs(60),
        || {
            let log = parse_memhog(&dst.logs())?;
            if log.mismatch.is_some() || log.ticks.len() >= 2 {
                Ok(log)
            } else {
                Err(format!("{log:?}, container running: {}", dst.is_running()))
            }
        },
    );
    assert_eq!(after.mismatch, None, "memory changed in the migration");
    assert_eq!(after.ready, None, "memhog started over instead of resuming");
    assert_eq!(
        after.ticks[0].0,
        last_tick + 1,
        "the restored memhog's first tick should follow node1's last ({last_tick}): {:?}",
        after.ticks
    );
    for (tick, sum) in &after.ticks {
        assert_eq!(
            sum, &checksum,
            "tick {tick}: checksum on {} differs from {}'s",
            b.name, a.name
        );
    }
    eprintln!(
        "{} ticked to {last_tick} with checksum {checksum}, {} went on with {:?}",
        a.name, b.name, after.ticks
    );
}
