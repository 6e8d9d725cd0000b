//! What refusing a bad update costs in memory, seen in the resident peak of a process that
//! does nothing else: each test runs its measurement in a process of its own (this binary
//! again), since memory another test freed stays resident for a while and would be reused
//! without raising the peak.

mod common;

use common::memory::{measured_in_a_process_of_its_own, resident_rise_during};
use outpost::config::Mapping;
use outpost::profile::prune::KeepTree;
use outpost::profile::update::{update_from_json_with, Parsing};

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
