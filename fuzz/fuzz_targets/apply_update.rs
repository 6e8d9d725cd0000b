//! Lines of input (a stored version, then updates): when they parse, applying them never
//! panics, an export's payload is a JSON object, and the record engine (what the store runs)
//! gives the same result, export and payload as the rules on JSON values.
#![no_main]

use libfuzzer_sys::fuzz_target;
use outpost::config::Mapping;
use outpost::profile::apply::{apply, StoreAction};
use outpost::profile::engine::{apply_record, RecordAction};
use outpost::profile::layout::Layout;
use outpost::profile::prune::KeepTree;
use outpost::profile::update::parse_body;

fuzz_target!(|data: &[u8]| {
    // The one known difference: records compare `-0.0` and `0.0` as different values.
    if data.windows(2).any(|w| w == b"-0") {
        return;
    }
    let Ok(mut updates) = parse_body(data) else {
        return;
    };
    let mapping = Mapping::new(
        &["person.name.firstName", "person", "a.b"],
        &["s1", "s2"],
        &["ecid"],
    );
    let layout = Layout::new(&mapping);
    let keep = KeepTree::for_mapping(&mapping);
    let now = chrono::Utc::now();
    let (mut stored, mut record) = (None, None);
    for update in &mut updates {
        keep.prune(&mut update.profile);
        let applied = apply(stored.as_ref(), update, &mapping, now);
        let by_record = apply_record(record.as_ref(), update, &mapping, &layout, now);
        assert_eq!(applied.result, by_record.result);
        let payload = by_record.export.as_ref().map(|(reason, text)| {
            let value: serde_json::Value = serde_json::from_str(text).expect("payload is JSON");
            assert!(value.is_object(), "{text}");
            (*reason, value)
        });
        assert_eq!(applied.export, payload);
        match applied.store {
            StoreAction::Keep => {}
            StoreAction::Put(new) => stored = Some(new),
            StoreAction::Remove => stored = None,
        }
        match by_record.store {
            RecordAction::Keep => {}
            RecordAction::Put(new) => record = Some(new.into_owned()),
            RecordAction::Remove => record = None,
        }
    }
});
