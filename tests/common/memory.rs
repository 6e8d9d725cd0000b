//! Measuring what a piece of work costs in resident memory: each measurement runs in a
//! process of its own (the test binary again, running that one test), since memory another
//! test freed stays resident for a while and would be reused without raising the peak.

use std::path::Path;

/// A field of `/proc/self/status`, in KiB.
pub fn status_kib(field: &str) -> usize {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    let line = status
        .lines()
        .find_map(|line| line.strip_prefix(field))
        .unwrap_or_else(|| panic!("no {field} in /proc/self/status"));
    line.trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .expect("a size in kB")
}

const CHILD: &str = "OUTPOST_MEMORY_TEST_CHILD";

/// In the test process: runs `test` of this binary alone in a new process and fails if it
/// fails, returning true (the caller is done). In that new process: false (the caller
/// measures).
pub fn measured_in_a_process_of_its_own(test: &str) -> bool {
    measured_in_a_process_of_its_own_with(test, &[])
}

/// [`measured_in_a_process_of_its_own`], with `envs` set in the new process.
pub fn measured_in_a_process_of_its_own_with(test: &str, envs: &[(&str, &Path)]) -> bool {
    if std::env::var_os(CHILD).is_some() {
        return false;
    }
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([test, "--exact", "--test-threads", "1", "--nocapture"])
        .env(CHILD, "1")
        .envs(envs.iter().copied())
        .output()
        .unwrap();
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("1 passed"),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    true
}

/// How far the process's resident memory rose above where it was while `work` ran: the peak
/// (`VmHWM`) is set back to the present (`VmRSS`) first, by writing 5 to `clear_refs`.
pub fn resident_rise_during<T>(work: impl FnOnce() -> T) -> (T, usize) {
    std::fs::write("/proc/self/clear_refs", "5").expect("resetting the resident peak");
    let before = status_kib("VmHWM:");
    let result = work();
    (result, (status_kib("VmHWM:") - before) * 1024)
}
