//! What the kernel says a process tree costs: CPU time and memory from `/proc`.
//!
//! A proxy is measured as its whole process tree (nginx's master and worker, for example), from
//! the processes' own accounting: no sampling, no external profiler.

use std::fs;

/// The process and all its descendants, parents first.
pub fn tree(root: u32) -> Vec<u32> {
    let mut out = vec![root];
    let mut next = 0;
    while next < out.len() {
        let pid = out[next];
        next += 1;
        let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
            continue;
        };
        for task in tasks.flatten() {
            let path = task.path().join("children");
            if let Ok(children) = fs::read_to_string(path) {
                out.extend(
                    children
                        .split_whitespace()
                        .filter_map(|c| c.parse::<u32>().ok()),
                );
            }
        }
    }
    out.sort_unstable();
    out.dedup();
    out
}

/// User plus system CPU seconds the tree has used so far (live processes only).
pub fn cpu_seconds(root: u32) -> f64 {
    let ticks_per_second = rustix::param::clock_ticks_per_second() as f64;
    tree(root)
        .into_iter()
        .filter_map(|pid| fs::read_to_string(format!("/proc/{pid}/stat")).ok())
        .filter_map(|stat| {
            // Fields after the command name, which is in parentheses and may hold spaces.
            let rest = &stat[stat.rfind(')')? + 2..];
            let fields: Vec<&str> = rest.split(' ').collect();
            // utime and stime are fields 14 and 15 of the whole line: 11 and 12 after ')'.
            let utime: u64 = fields.get(11)?.parse().ok()?;
            let stime: u64 = fields.get(12)?.parse().ok()?;
            Some((utime + stime) as f64 / ticks_per_second)
        })
        .sum()
}

fn status_kib(pid: u32, key: &str) -> Option<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix(key))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
}

/// Resident memory of the tree now (`VmRSS` summed), in bytes.
pub fn rss_bytes(root: u32) -> u64 {
    tree(root)
        .into_iter()
        .filter_map(|pid| status_kib(pid, "VmRSS:"))
        .sum::<u64>()
        * 1024
}

/// Peak resident memory of the tree (`VmHWM` summed over its processes), in bytes.
pub fn peak_rss_bytes(root: u32) -> u64 {
    tree(root)
        .into_iter()
        .filter_map(|pid| status_kib(pid, "VmHWM:"))
        .sum::<u64>()
        * 1024
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_process_is_measured() {
        let me = std::process::id();
        assert!(tree(me).contains(&me));
        assert!(rss_bytes(me) > 0);
        assert!(peak_rss_bytes(me) >= rss_bytes(me) / 2);
        // Burn a little CPU so the reading cannot be zero at tick resolution.
        let started = std::time::Instant::now();
        let mut x = 1u64;
        while started.elapsed() < std::time::Duration::from_millis(60) {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
        }
        assert!(x != 0 || cpu_seconds(me) >= 0.0);
        assert!(cpu_seconds(me) > 0.0);
    }

    #[test]
    fn children_are_part_of_the_tree() {
        let mut child = std::process::Command::new("sleep")
            .arg("5")
            .spawn()
            .unwrap();
        let members = tree(std::process::id());
        let _ = child.kill();
        let _ = child.wait();
        assert!(members.contains(&child.id()), "{members:?}");
    }
}
