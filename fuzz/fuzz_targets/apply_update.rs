//! Two lines of input (a stored version, then an update): when both parse, applying them
//! never panics, and an export's payload is a JSON object.
#![no_main]

use libfuzzer_sys::fuzz_target;
use outpost::config::Mapping;
use outpost::profile::apply::{apply, StoreAction};
use outpost::profile::update::parse_body;

fuzz_target!(|data: &[u8]| {
    let Ok(updates) = parse_body(data) else {
        return;
    };
    let mapping = Mapping::new(
        &["person.name.firstName", "person"],
        &["s1", "s2"],
        &["ecid"],
    );
    let now = chrono::Utc::now();
    let mut stored = None;
    for update in &updates {
        let applied = apply(stored.as_ref(), update, &mapping, now);
        if let Some((_, payload)) = &applied.export {
            assert!(payload.is_object(), "{payload}");
        }
        match applied.store {
            StoreAction::Keep => {}
            StoreAction::Put(new) => stored = Some(new),
            StoreAction::Remove => stored = None,
        }
    }
});
