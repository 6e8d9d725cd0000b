//! What refusing a bad update costs in memory, seen in the resident peak of a process that
//! does nothing else: each test runs its measurement in a process of its own (this binary
//! again), since memory another test freed stays resident for a while and would be reused
//! without raising the peak.

use outpost::config::Mapping;
use outpost::profile::prune::KeepTree;
use outpost::profile::update::{update_from_json_with, Parsing};

/// A field of `/proc/self/status`, in KiB.
fn status_kib(field: &str) -> usize {
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
fn measured_in_a_process_of_its_own(test: &str) -> bool {
    if std::env::var_os(CHILD).is_some() {
        return false;
    }
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([test, "--exact", "--test-threads", "1", "--nocapture"])
        .env(CHILD, "1")
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
fn resident_rise_during<T>(work: impl FnOnce() -> T) -> (T, usize) {
    std::fs::write("/proc/self/clear_refs", "5").expect("resetting the resident peak");
    let before = status_kib("VmHWM:");
    let result = work();
    (result, (status_kib("VmHWM:") - before) * 1024)
}

/// A line of megabytes whose last field has the wrong type is refused naming that field, and
/// finding it builds nothing of the profile it passed over: the unmapped parts the parse
/// prunes were once built whole (about 16 times the text) only to name the field.
#[test]
fn an_ill_typed_field_after_a_large_profile_is_named_without_building_the_profile() {
    if measured_in_a_process_of_its_own(
        "an_ill_typed_field_after_a_large_profile_is_named_without_building_the_profile",
    ) {
        return;
    }
    let mut line = String::from(r#"{"op":"upsert","profile":{"#);
    for i in 0..100_000 {
        line.push_str(&format!(r#""attribute{i}":{{"a":[1,2,"three"],"b":{i}}},"#));
    }
    line.push_str(r#""person":{"name":{"firstName":"Ada"}}},"id":5}"#);
    let mapping = Mapping::new(&["person.name.firstName"], &["s1"], &["ecid"]);
    let keep = KeepTree::for_mapping(&mapping);
    let parsing = Parsing {
        limit: None,
        keep: Some(&keep),
        layout: None,
    };

    let (refused, rise) =
        resident_rise_during(|| update_from_json_with(line.as_bytes(), 7, &parsing));

    let error = refused.expect_err("an id that is a number is refused");
    assert_eq!(error.line, 7);
    assert_eq!(error.reason, "`id` must be a string, not a number");
    assert!(
        rise < line.len() / 2,
        "refusing a line of {} bytes raised the resident peak by {rise} bytes",
        line.len()
    );
}

/// Nor does it keep the names of the other fields it passes over: a line of many unknown
/// top-level fields is refused for its first problem at the cost of its text.
#[test]
fn a_line_of_many_unknown_fields_is_refused_without_keeping_their_names() {
    if measured_in_a_process_of_its_own(
        "a_line_of_many_unknown_fields_is_refused_without_keeping_their_names",
    ) {
        return;
    }
    let mut line = String::from(r#"{"id":5"#);
    for i in 0..200_000 {
        line.push_str(&format!(r#","x{i}":0"#));
    }
    line.push('}');

    let (refused, rise) =
        resident_rise_during(|| update_from_json_with(line.as_bytes(), 3, &Parsing::default()));

    let error = refused.expect_err("an id that is a number is refused");
    assert_eq!(error.reason, "`id` must be a string, not a number");
    assert!(
        rise < line.len() / 2,
        "refusing a line of {} bytes raised the resident peak by {rise} bytes",
        line.len()
    );
}
