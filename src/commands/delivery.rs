//! `outpost delivery pause` and `resume`: stop sending exports while updates are still taken,
//! and send them again. Through the running agent, or on the store itself, where the agent
//! finds the pause when it starts.

use serde_json::Value;

use crate::admin::AdminRequest;
use crate::cli::DeliveryCommand;

use super::outbox::Print;
use super::{print_json, text_of, Backend, CliError};

/// A delivery command; what it prints, to be printed once the store is closed.
pub(super) fn delivery(backend: &Backend, command: DeliveryCommand) -> Result<Print, CliError> {
    let (request, flag) = match command {
        DeliveryCommand::Pause(flag) => (AdminRequest::PauseDelivery, flag),
        DeliveryCommand::Resume(flag) => (AdminRequest::ResumeDelivery, flag),
    };
    let answer = backend.execute(&request)?;
    Ok(Box::new(move || match flag.json {
        true => print_json(&answer, true),
        false => outln!("{}", said(&answer)),
    }))
}

/// What a pause or a resume did, for people, from its answer.
fn said(answer: &Value) -> String {
    let since = text_of(&answer["paused_since"]);
    let pending = text_of(&answer["pending"]);
    match (answer["delivery_paused"] == true, answer["changed"] == true) {
        (true, true) => format!("delivery paused; {pending} exports pending"),
        (true, false) => format!("delivery was already paused since {since}"),
        (false, true) => {
            format!("delivery resumed (paused since {since}); {pending} exports pending")
        }
        (false, false) => "delivery was not paused".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn each_answer_is_said_as_what_was_done() {
        let since = "2026-01-01T00:00:00.000Z";
        let table = [
            (
                json!({"delivery_paused": true, "changed": true, "paused_since": since, "pending": 3}),
                "delivery paused; 3 exports pending".to_owned(),
            ),
            (
                json!({"delivery_paused": true, "changed": false, "paused_since": since, "pending": 3}),
                format!("delivery was already paused since {since}"),
            ),
            (
                json!({"delivery_paused": false, "changed": true, "paused_since": since, "pending": 0}),
                format!("delivery resumed (paused since {since}); 0 exports pending"),
            ),
            (
                json!({"delivery_paused": false, "changed": false, "paused_since": null, "pending": 0}),
                "delivery was not paused".to_owned(),
            ),
        ];
        for (answer, expected) in table {
            assert_eq!(said(&answer), expected, "{answer}");
        }
    }
}
