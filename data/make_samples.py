#!/usr/bin/env python3
"""Builds data/sample-updates.ndjson: deterministic sample profile updates for outpost.

Usage:
    python3 data/make_samples.py [--out PATH] [--expected PATH] [--examples DIR]

  --out PATH       where to write the updates (default: sample-updates.ndjson beside this script)
  --expected PATH  also write, one JSON object a line, what SPEC says each update must do:
                   {"line": n, "id": ..., "kind": ..., "result": "exported"|"unchanged"|"stale"|"deleted",
                    "reason": "segment"|"identity"|"attribute"|"delete"|null}
  --examples DIR   check that the XDM excerpts embedded below are identical to the files in DIR
                   (for example /work/shared/data/xdm-examples)

Python 3 standard library only, fixed random seed: running it twice gives byte-identical output.

The profiles are built from Adobe's XDM examples (github.com/adobe/xdm, CC BY 4.0), embedded below
verbatim and with their `xdm:` prefixes stripped, as Adobe Experience Platform's HTTP API
destination exports profiles. The script carries a small model of SPEC "When an update produces
an export" and checks that every generated update does what its kind intends.
"""

import argparse
import copy
import hashlib
import json
import os
import random
import sys
from collections import Counter
from datetime import datetime, timedelta, timezone

SEED = 20260101
PROFILES = 400
START = datetime(2026, 1, 1, 0, 0, 0, tzinfo=timezone.utc)

# The mapping of data/outpost.example.toml.
SEG_A = "7841ba61-23c1-4bb3-a495-00d3g5fe1e93"
SEG_B = "59bd2fkd-3c48-4b18-bf56-4f5c5e6967ae"
MAPPED_SEGMENTS = [SEG_A, SEG_B]
MAPPED_ATTRIBUTES = [
    ["person", "name", "firstName"],
    ["person", "name", "lastName"],
    ["person", "birthDate"],
    ["personalEmail", "address"],
]
MAPPED_NAMESPACES = ["ecid", "email_lc_sha256"]

# ---------------------------------------------------------------------------------------------
# Excerpts of github.com/adobe/xdm (commit 4a4fc5f8dd175cd81f2419b85130a6fc25053890), CC BY 4.0.
# Copied verbatim; see /work/shared/data/xdm-examples/SOURCES.txt for the original paths.
# ---------------------------------------------------------------------------------------------
XDM_EXAMPLES = {
    "person.example.1.json": """{
  "xdm:name": {
    "xdm:firstName": "Jane",
    "xdm:middleName": "F",
    "xdm:lastName": "Doe",
    "xdm:fullName": "Jane F. Doe"
  },
  "xdm:birthDate": "1996-01-19",
  "xdm:gender": "female",
  "xdm:maritalStatus": "single",
  "xdm:nationality": "CA"
}""",
    "person-name.example.1.json": """{
  "xdm:firstName": "John",
  "xdm:middleName": "S",
  "xdm:lastName": "Doe",
  "xdm:fullName": "John S. Doe"
}""",
    "person-name.example.2.json": """{
  "xdm:firstName": "张",
  "xdm:lastName": "三",
  "xdm:fullName": "张三"
}""",
    "person-name.example.3.json": """{
  "xdm:firstName": "فلانة",
  "xdm:lastName": "الفلانية",
  "xdm:fullName": "فلانة الفلانية"
}""",
    "profile-person-details.example.1.json": """{
  "xdm:person": {
    "xdm:name": {
      "xdm:firstName": "Jane",
      "xdm:middleName": "F",
      "xdm:lastName": "Doe",
      "xdm:fullName": "Jane F. Doe"
    },
    "xdm:birthDayAndMonth": "01-03",
    "xdm:gender": "female"
  }
}""",
    "emailaddress.example.1.json": """{
  "xdm:primary": false,
  "xdm:address": "jsmith@xyzinc.com",
  "xdm:label": "John Smith",
  "xdm:type": "work",
  "xdm:status": "active"
}""",
    "profile-personal-details.example.1.json": """{
  "xdm:mobilePhone": {
    "xdm:primary": true,
    "xdm:number": "1-408-888-8888",
    "xdm:status": "active"
  }
}""",
    "profile-personal-details.example.2.json": """{
  "xdm:shippingAddressPhone": {
    "xdm:primary": false,
    "xdm:number": "1-408-888-8888"
  },
  "xdm:shippingAddress": {
    "xdm:primary": false,
    "xdm:street1": "345 Park Ave",
    "xdm:city": "San Jose",
    "xdm:state": "CA",
    "xdm:postalCode": "95110",
    "xdm:country": "United States"
  }
}""",
    "identitymap.example.2.json": """{
  "EMAIL": [
    {
      "xdm:id": "92312748749128"
    },
    {
      "xdm:id": "92312748749239"
    }
  ],
  "CRM": [
    {
      "xdm:id": "2394509340-30453470347",
      "xdm:authenticatedState": "authenticated"
    }
  ]
}""",
    "segmentation.example.1.json": """{
  "xdm:segmentMembership": {
    "AAM": {
      "04a81716-43d6-4e7a-a49c-f1d8b3129ba9": {
        "xdm:version": "15",
        "xdm:timestamp": "2018-04-26T15:52:25+00:00",
        "xdm:validUntil": "2019-04-26T15:52:25+00:00",
        "xdm:status": "existing"
      },
      "53cba6b2-a23b-454a-8069-fc41308f1c0f": {
        "xdm:version": "3",
        "xdm:lastQualificationTime": "2018-04-26T15:52:25+00:00",
        "xdm:validUntil": "2018-04-27T15:52:25+00:00",
        "xdm:status": "realized"
      }
    },
    "Email": {
      "abcd@adobe.com": {
        "xdm:version": "1",
        "xdm:lastQualificationTime": "2017-09-26T15:52:25+00:00",
        "xdm:validUntil": "2017-12-26T15:52:25+00:00",
        "xdm:status": "exited"
      }
    }
  }
}""",
}


def strip_xdm(value):
    """The example without `xdm:` prefixes on its keys."""
    if isinstance(value, dict):
        return {(k[4:] if k.startswith("xdm:") else k): strip_xdm(v) for k, v in value.items()}
    if isinstance(value, list):
        return [strip_xdm(v) for v in value]
    return value


def load_examples(check_dir):
    examples = {}
    for name, text in XDM_EXAMPLES.items():
        if check_dir:
            with open(os.path.join(check_dir, name), encoding="utf-8") as f:
                if json.load(f) != json.loads(text):
                    sys.exit(f"embedded copy of {name} differs from {check_dir}/{name}")
        examples[name] = strip_xdm(json.loads(text))
    return examples


# ---------------------------------------------------------------------------------------------
# The model of SPEC "When an update produces an export" (independent of the Rust code).
# ---------------------------------------------------------------------------------------------


def merge_patch(target, patch):
    """RFC 7386."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def make_patch(old, new):
    """An RFC 7386 patch turning `old` into `new` (no nulls in profiles)."""
    patch = {}
    for key in old:
        if key not in new:
            patch[key] = None
    for key, value in new.items():
        if key not in old:
            patch[key] = copy.deepcopy(value)
        elif old[key] != value:
            if isinstance(value, dict) and isinstance(old[key], dict):
                patch[key] = make_patch(old[key], value)
            else:
                patch[key] = copy.deepcopy(value)
    return patch


def is_member(profile, segment):
    entry = profile.get("segmentMembership", {}).get("ups", {}).get(segment)
    return isinstance(entry, dict) and entry.get("status") in ("realized", "existing")


def member_of_any(profile):
    return any(is_member(profile, s) for s in MAPPED_SEGMENTS)


def value_at(profile, path):
    value = profile
    for key in path:
        if not isinstance(value, dict) or key not in value:
            return ("absent",)
        value = value[key]
    return ("present", value)


def identity_set(profile, namespace):
    items = profile.get("identityMap", {}).get(namespace, [])
    return {json.dumps(item, sort_keys=True) for item in items}


def decide(old, new):
    if any(is_member(old, s) != is_member(new, s) for s in MAPPED_SEGMENTS):
        return "segment"
    if not member_of_any(new):
        return None
    if any(identity_set(old, ns) != identity_set(new, ns) for ns in MAPPED_NAMESPACES):
        return "identity"
    if any(value_at(old, p) != value_at(new, p) for p in MAPPED_ATTRIBUTES):
        return "attribute"
    return None


# ---------------------------------------------------------------------------------------------
# Building profiles.
# ---------------------------------------------------------------------------------------------

FIRST_NAMES = ["Amara", "Bruno", "Chloé", "Dmitri", "Elena", "Farid", "Grace", "Hiroshi", "Ines",
               "Jonas", "Kavya", "Liam", "Mei", "Nour", "Olga", "Pablo", "Quinn", "Rania", "Sven",
               "Tomás", "Uma", "Viktor", "Wen", "Yusuf", "Zoë"]
LAST_NAMES = ["Andersen", "Baptiste", "Chen", "Dubois", "Eriksson", "Fernández", "García", "Haddad",
              "Ito", "Jensen", "Kowalski", "Lefèvre", "Müller", "Nakamura", "Okafor", "Petrov",
              "Rossi", "Silva", "Tanaka", "Weber"]
PLACES = [  # (city, stateProvince, postalCode, country, countryCode)
    ("San Jose", "US-CA", "95110", "United States", "US"),
    ("Toronto", "CA-ON", "M5V 2T6", "Canada", "CA"),
    ("Lyon", "FR-ARA", "69002", "France", "FR"),
    ("Hamburg", "DE-HH", "20095", "Germany", "DE"),
    ("Osaka", "JP-27", "530-0001", "Japan", "JP"),
    ("Lisbon", "PT-11", "1100-148", "Portugal", "PT"),
]
STREETS = ["Park Ave", "Main St", "Rue de la République", "Mönckebergstraße", "Rua Augusta", "King St W"]
UNMAPPED_SEGMENTS = ["04a81716-43d6-4e7a-a49c-f1d8b3129ba9", "53cba6b2-a23b-454a-8069-fc41308f1c0f"]


def ts_text(t):
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


def email_hash(address):
    return hashlib.sha256(address.strip().lower().encode("utf-8")).hexdigest()


class Builder:
    def __init__(self, rng, examples):
        self.rng = rng
        self.ex = examples
        self.example_names = [
            examples["person.example.1.json"]["name"],
            examples["person-name.example.1.json"],
            examples["person-name.example.2.json"],
            examples["person-name.example.3.json"],
        ]
        self.crm_example = examples["identitymap.example.2.json"]["CRM"][0]
        self.unmapped_entries = examples["segmentation.example.1.json"]["segmentMembership"]["AAM"]

    def ecid(self):
        return "".join(self.rng.choice("0123456789") for _ in range(38)).lstrip("0") or "1"

    def name(self, n):
        rng = self.rng
        if rng.random() < 0.15:
            name = copy.deepcopy(rng.choice(self.example_names))
        else:
            first, last = rng.choice(FIRST_NAMES), rng.choice(LAST_NAMES)
            name = {"firstName": first, "lastName": last, "fullName": f"{first} {last}"}
            if rng.random() < 0.3:
                middle = rng.choice("ABCDEFGHJKLMNPRSTW")
                name = {"firstName": first, "middleName": middle, "lastName": last,
                        "fullName": f"{first} {middle}. {last}"}
        return name

    def email_for(self, n, name):
        ascii_name = name["firstName"].isascii() and name["lastName"].isascii()
        local = f"{name['firstName']}.{name['lastName']}.{n}" if ascii_name else f"customer{n:06d}"
        domain = self.rng.choice(["example.com", "example.org", "mail.example.net"])
        address = f"{local}@{domain}"
        # Producers do not always lower-case addresses; email_lc_sha256 is of the lower-cased one.
        return address if self.rng.random() < 0.3 else address.lower()

    def birth_date(self):
        day = datetime(1950, 1, 1) + timedelta(days=self.rng.randrange(0, 20000))
        return day.strftime("%Y-%m-%d")

    def profile(self, n, t):
        """A new profile (without segmentMembership) of customer n, after the XDM examples."""
        rng = self.rng
        person_example = self.ex["person.example.1.json"]
        name = self.name(n)
        person = {"name": name}
        if rng.random() < 0.8:
            person["birthDate"] = self.birth_date()
        else:  # as profile-person-details.example.1: only birthDayAndMonth (unmapped)
            person["birthDayAndMonth"] = self.ex["profile-person-details.example.1.json"]["person"]["birthDayAndMonth"]
        person["gender"] = rng.choice(["female", "male", "not_specified", person_example["gender"]])
        if rng.random() < 0.5:
            person["maritalStatus"] = person_example["maritalStatus"]
            person["nationality"] = rng.choice(["CA", "US", "FR", "DE", "JP", "PT"])

        email = dict(self.ex["emailaddress.example.1.json"])
        email.update({"primary": True, "address": self.email_for(n, name),
                      "label": name["fullName"], "type": "personal"})

        ship = self.ex["profile-personal-details.example.2.json"]["shippingAddress"]
        city, province, postal, country, code = rng.choice(PLACES)
        home = {"primary": True, "street1": f"{rng.randrange(1, 999)} {rng.choice(STREETS)}",
                "city": city, "stateProvince": province, "postalCode": postal,
                "country": country, "countryCode": code, "status": "active"}
        if city == ship["city"]:
            home["street1"] = ship["street1"]

        phone = dict(self.ex["profile-personal-details.example.1.json"]["mobilePhone"])
        phone["number"] = f"1-408-{rng.randrange(200, 999)}-{rng.randrange(0, 10000):04d}"

        identities = {"ecid": [{"id": self.ecid(), "authenticatedState": "ambiguous", "primary": True}]}
        if rng.random() < 0.35:
            identities["ecid"].append({"id": self.ecid(), "authenticatedState": "ambiguous"})
        if rng.random() < 0.75:
            identities["email_lc_sha256"] = [{"id": email_hash(email["address"]),
                                              "authenticatedState": "authenticated"}]
        if rng.random() < 0.5:
            identities["crmid"] = [self.crm_id(n)]
        profile = {"person": person, "personalEmail": email, "homeAddress": home, "mobilePhone": phone,
                   "identityMap": identities, "segmentMembership": {"ups": {}}}
        if rng.random() < 0.4:  # an unmapped segment, as in segmentation.example.1
            self.set_unmapped_segment(profile, t)
        return profile

    def crm_id(self, n):
        example = self.crm_example
        prefix = example["id"].split("-")[0]
        return {"id": f"{prefix}-{n:011d}", "authenticatedState": example["authenticatedState"]}

    def set_unmapped_segment(self, profile, t):
        seg = self.rng.choice(UNMAPPED_SEGMENTS)
        status = self.rng.choice(["realized", "existing", "exited"])
        profile["segmentMembership"]["ups"][seg] = {"status": status, "lastQualificationTime": ts_text(t)}


# ---------------------------------------------------------------------------------------------
# The update kinds. Each returns (update_without_id_and_timestamp, intended_result, intended_reason)
# or None when it does not apply to the profile's current state.
# ---------------------------------------------------------------------------------------------


def ups(profile):
    return profile.setdefault("segmentMembership", {}).setdefault("ups", {})


class Profile:
    def __init__(self, n):
        self.n = n
        self.id = f"p-{n:06d}"
        self.stored = None  # the profile as the agent stores it, None when unknown
        self.stored_ts = None
        self.last_line = None  # the last update that was applied (not stale), for exact resends
        self.remaining = 0


class Generator:
    def __init__(self, rng, builder):
        self.rng = rng
        self.b = builder
        self.clock = START
        self.lines = []
        self.expected = []
        self.kinds = Counter()
        self.ops = Counter()
        self.results = Counter()

    # -- emitting -----------------------------------------------------------------------------

    def emit(self, p, kind, op, body, t, intended):
        update = {"id": p.id}
        if op != "upsert" or self.rng.random() < 0.1:
            update["op"] = op
        update["timestamp"] = ts_text(t)
        if op != "delete":
            update["profile"] = body
        self.record(p, kind, update, intended)

    def record(self, p, kind, update, intended):
        result, reason = self.model(p, update)
        if (result, reason) != intended:
            raise AssertionError(f"{p.id} {kind}: intended {intended}, model says {(result, reason)}: {update}")
        line = json.dumps(update, ensure_ascii=False, separators=(",", ":"))
        self.lines.append(line)
        self.expected.append({"line": len(self.lines), "id": p.id, "kind": kind, "result": result, "reason": reason})
        self.kinds[kind] += 1
        self.ops[update.get("op", "upsert")] += 1
        self.results[(result, reason)] += 1

    def model(self, p, update):
        """Applies `update` to the model store; returns (result, reason)."""
        t = update.get("timestamp")
        if t is not None and p.stored is not None and p.stored_ts is not None and t < p.stored_ts:
            return ("stale", None)  # same fixed format: string order is time order
        op = update.get("op", "upsert")
        old = p.stored if p.stored is not None else {}
        if op == "delete":
            if p.stored is None:
                return ("unchanged", None)
            reason = "delete" if member_of_any(old) else None
            p.stored, p.stored_ts, p.last_line = None, None, None
            return ("deleted", reason)
        new = merge_patch(old, update["profile"]) if op == "merge" else copy.deepcopy(update["profile"])
        reason = decide(old, new)
        p.stored = new
        if t is not None:
            p.stored_ts = t
        p.last_line = update
        return ("exported" if reason else "unchanged", reason)

    def tick(self):
        self.clock += timedelta(seconds=self.rng.randint(1, 6))
        return self.clock

    def change(self, p, kind, mutate, intended, op=None, t=None):
        """Emits the stored profile changed by `mutate`, as an upsert or a merge patch."""
        t = t or self.tick()
        new = copy.deepcopy(p.stored)
        mutate(new, t)
        if op is None:
            op = "merge" if self.rng.random() < 0.3 else "upsert"
        body = make_patch(p.stored, new) if op == "merge" else new
        if op == "merge":
            assert merge_patch(p.stored, body) == new
        self.emit(p, kind, op, body, t, intended)

    # -- first sight --------------------------------------------------------------------------

    def first(self, p):
        rng = self.rng
        t = self.tick()
        profile = self.b.profile(p.n, t)
        roll = rng.random()
        if roll < 0.70:
            segs = [SEG_A] if rng.random() < 0.6 else ([SEG_B] if rng.random() < 0.5 else [SEG_A, SEG_B])
            for s in segs:
                ups(profile)[s] = {"status": rng.choice(["realized", "realized", "existing"]),
                                   "lastQualificationTime": ts_text(t - timedelta(minutes=rng.randint(0, 600)))}
            self.emit(p, "first_sight_qualifying", "upsert", profile, t, ("exported", "segment"))
        elif roll < 0.82:
            if not ups(profile):
                self.b.set_unmapped_segment(profile, t)
            self.emit(p, "first_sight_unmapped_segments_only", "upsert", profile, t, ("unchanged", None))
        elif roll < 0.90:
            ups(profile).clear()
            self.emit(p, "first_sight_no_segments", "upsert", profile, t, ("unchanged", None))
        else:
            ups(profile)[rng.choice(MAPPED_SEGMENTS)] = {"status": "exited", "lastQualificationTime": ts_text(t)}
            self.emit(p, "first_sight_mapped_segment_exited", "upsert", profile, t, ("unchanged", None))

    # -- follow-ups ---------------------------------------------------------------------------

    def follow_up(self, p):
        if p.stored is None:
            self.recreate(p)
            return
        member = member_of_any(p.stored)
        table = self.MEMBER_KINDS if member else self.NONMEMBER_KINDS
        kinds = [k for k, _ in table]
        weights = [w for _, w in table]
        while True:
            kind = self.rng.choices(kinds, weights)[0]
            if getattr(self, kind)(p) is not False:
                return

    MEMBER_KINDS = [
        ("mapped_attribute_change", 14), ("mapped_attribute_added_or_removed", 3),
        ("email_change_with_identity", 4), ("email_case_change", 2), ("identity_and_attribute_change", 2),
        ("unmapped_attribute_change", 12), ("identity_added", 6), ("identity_removed", 4),
        ("identity_reorder", 5), ("identity_empty_array", 6), ("unmapped_identity_change", 5),
        ("realized_to_existing", 7), ("unmapped_segment_change", 7), ("second_segment_qualifies", 4),
        ("exit_status_exited", 5), ("exit_entry_vanished_upsert", 3), ("exit_entry_vanished_merge", 3),
        ("exit_with_attribute_change", 1.5), ("exact_resend", 6), ("same_profile_later_timestamp", 4),
        ("stale", 2.5), ("delete_member", 1.5),
    ]
    NONMEMBER_KINDS = [
        ("nonmember_mapped_attribute_change", 8), ("unmapped_attribute_change", 5),
        ("nonmember_identity_change", 4), ("unmapped_segment_change", 5), ("exited_entry_refreshed", 5),
        ("exited_entry_removed", 3), ("qualifies_later", 6), ("exact_resend", 3), ("stale", 1.5),
        ("delete_nonmember", 1.5),
    ]

    def _expect_member(self, p, reason):
        return ("exported", reason) if member_of_any(p.stored) else ("unchanged", None)

    def mapped_attribute_change(self, p):
        rng = self.rng
        choice = rng.choice(["firstName", "lastName", "birthDate", "all_names"])
        if choice == "birthDate" and "birthDate" not in p.stored["person"]:
            choice = "firstName"

        def mutate(new, t):
            name = new["person"]["name"]
            if choice in ("firstName", "all_names"):
                name["firstName"] = rng.choice([f for f in FIRST_NAMES if f != name["firstName"]])
            if choice in ("lastName", "all_names"):
                name["lastName"] = rng.choice([l for l in LAST_NAMES if l != name["lastName"]])
            if choice == "birthDate":
                old = new["person"]["birthDate"]
                while new["person"]["birthDate"] == old:
                    new["person"]["birthDate"] = self.b.birth_date()
            middle = f" {name['middleName']}." if "middleName" in name else ""
            name["fullName"] = f"{name['firstName']}{middle} {name['lastName']}"
            new["personalEmail"]["label"] = name["fullName"]

        self.change(p, "mapped_attribute_change", mutate, self._expect_member(p, "attribute"))

    def mapped_attribute_added_or_removed(self, p):
        def mutate(new, t):
            person = new["person"]
            if "birthDate" in person:
                del person["birthDate"]
            else:
                person["birthDate"] = self.b.birth_date()

        self.change(p, "mapped_attribute_added_or_removed", mutate, ("exported", "attribute"))

    def email_change_with_identity(self, p):
        """A new personal email; its hash replaces the email_lc_sha256 identity: reason identity."""
        def mutate(new, t):
            address = f"customer{p.n:06d}.{self.rng.randrange(1000, 9999)}@example.net"
            new["personalEmail"]["address"] = address
            new["identityMap"]["email_lc_sha256"] = [{"id": email_hash(address), "authenticatedState": "authenticated"}]

        self.change(p, "email_change_with_identity", mutate, ("exported", "identity"))

    def email_case_change(self, p):
        """Same address in another case: the hash is the same, the attribute differs."""
        address = p.stored["personalEmail"]["address"]
        other = address.lower() if address != address.lower() else address[:1].upper() + address[1:]
        if other == address:
            return False

        def mutate(new, t):
            new["personalEmail"]["address"] = other

        self.change(p, "email_case_change", mutate, ("exported", "attribute"))

    def identity_and_attribute_change(self, p):
        """Identity and attribute both change: identity comes first."""
        def mutate(new, t):
            new["identityMap"].setdefault("ecid", []).append({"id": self.b.ecid(), "authenticatedState": "ambiguous"})
            new["person"]["name"]["lastName"] = self.rng.choice(
                [l for l in LAST_NAMES if l != new["person"]["name"]["lastName"]])

        self.change(p, "identity_and_attribute_change", mutate, ("exported", "identity"))

    def unmapped_attribute_change(self, p):
        rng = self.rng
        choice = rng.choice(["mobilePhone", "homeAddress", "gender", "middleName", "loyalty"])

        def mutate(new, t):
            if choice == "mobilePhone":
                new["mobilePhone"]["number"] = f"1-408-{rng.randrange(200, 999)}-{rng.randrange(0, 10000):04d}"
            elif choice == "homeAddress":
                city, province, postal, country, code = rng.choice(PLACES)
                new["homeAddress"].update({"street1": f"{rng.randrange(1, 999)} {rng.choice(STREETS)}",
                                           "city": city, "stateProvince": province, "postalCode": postal,
                                           "country": country, "countryCode": code})
            elif choice == "gender":
                new["person"]["gender"] = rng.choice(
                    [g for g in ["female", "male", "not_specified", "non_specific"] if g != new["person"]["gender"]])
            elif choice == "middleName":
                name = new["person"]["name"]
                name["middleName"] = rng.choice([m for m in "ABCDEFGHJK" if m != name.get("middleName")])
            else:
                new["personalEmail"]["status"] = rng.choice(["active", "incomplete", "pending_verification"])
                new["mobilePhone"]["status"] = rng.choice(["active", "blacklisted"])

        self.change(p, "unmapped_attribute_change", mutate, ("unchanged", None))

    def identity_added(self, p):
        ids = p.stored["identityMap"]
        ns = "email_lc_sha256" if "email_lc_sha256" not in ids or not ids["email_lc_sha256"] else "ecid"

        def mutate(new, t):
            if ns == "ecid":
                new["identityMap"].setdefault("ecid", []).append({"id": self.b.ecid(), "authenticatedState": "ambiguous"})
            else:
                new["identityMap"]["email_lc_sha256"] = [
                    {"id": email_hash(new["personalEmail"]["address"]), "authenticatedState": "authenticated"}]

        self.change(p, "identity_added", mutate, ("exported", "identity"))

    def identity_removed(self, p):
        ids = p.stored["identityMap"]
        candidates = [ns for ns in MAPPED_NAMESPACES if ids.get(ns)]
        if not candidates:
            return False
        ns = self.rng.choice(candidates)
        how = self.rng.choice(["drop_one", "empty_array", "drop_namespace"])

        def mutate(new, t):
            if how == "drop_one" and len(new["identityMap"][ns]) > 1:
                new["identityMap"][ns].pop()
            elif how == "empty_array":
                new["identityMap"][ns] = []
            else:
                del new["identityMap"][ns]

        self.change(p, "identity_removed", mutate, ("exported", "identity"))

    def identity_reorder(self, p):
        ids = p.stored["identityMap"]
        multi = [ns for ns in MAPPED_NAMESPACES if len(ids.get(ns, [])) > 1]
        if not multi:
            return False

        def mutate(new, t):
            for ns in multi:
                new["identityMap"][ns].reverse()
            # and the namespaces in another order (object key order never matters)
            new["identityMap"] = dict(reversed(list(new["identityMap"].items())))

        self.change(p, "identity_reorder", mutate, ("unchanged", None), op="upsert")

    def identity_empty_array(self, p):
        ids = p.stored["identityMap"]
        absent = [ns for ns in MAPPED_NAMESPACES if ns not in ids]
        if not absent:
            return False

        def mutate(new, t):
            new["identityMap"][absent[0]] = []

        self.change(p, "identity_empty_array", mutate, ("unchanged", None))

    def unmapped_identity_change(self, p):
        def mutate(new, t):
            ids = new["identityMap"]
            if "crmid" in ids and self.rng.random() < 0.4:
                del ids["crmid"]
            elif "crmid" in ids:
                ids["crmid"][0]["authenticatedState"] = self.rng.choice(["loggedOut", "ambiguous"])
            else:
                ids["crmid"] = [self.b.crm_id(p.n)]

        self.change(p, "unmapped_identity_change", mutate, ("unchanged", None))

    def realized_to_existing(self, p):
        entries = ups(p.stored)
        realized = [s for s in MAPPED_SEGMENTS if entries.get(s, {}).get("status") == "realized"]
        if not realized:
            return False

        def mutate(new, t):
            for s in realized:
                ups(new)[s]["status"] = "existing"

        self.change(p, "realized_to_existing", mutate, ("unchanged", None))

    def unmapped_segment_change(self, p):
        def mutate(new, t):
            entries = ups(new)
            seg = self.rng.choice(UNMAPPED_SEGMENTS)
            if seg in entries and self.rng.random() < 0.4:
                del entries[seg]
            elif seg in entries:
                cur = entries[seg]["status"]
                entries[seg] = {"status": "exited" if cur != "exited" else "realized",
                                "lastQualificationTime": ts_text(t)}
            else:
                entries[seg] = {"status": "realized", "lastQualificationTime": ts_text(t)}

        self.change(p, "unmapped_segment_change", mutate, ("unchanged", None))

    def second_segment_qualifies(self, p):
        missing = [s for s in MAPPED_SEGMENTS if not is_member(p.stored, s)]
        if not missing:
            return False

        def mutate(new, t):
            ups(new)[missing[0]] = {"status": "realized", "lastQualificationTime": ts_text(t)}

        self.change(p, "second_segment_qualifies", mutate, ("exported", "segment"))

    def _member_segments(self, p):
        return [s for s in MAPPED_SEGMENTS if is_member(p.stored, s)]

    def exit_status_exited(self, p):
        seg = self.rng.choice(self._member_segments(p))

        def mutate(new, t):
            ups(new)[seg] = {"status": "exited", "lastQualificationTime": ts_text(t)}

        self.change(p, "exit_status_exited", mutate, ("exported", "segment"))

    def exit_entry_vanished_upsert(self, p):
        seg = self.rng.choice(self._member_segments(p))

        def mutate(new, t):
            del ups(new)[seg]

        self.change(p, "exit_entry_vanished_upsert", mutate, ("exported", "segment"), op="upsert")

    def exit_entry_vanished_merge(self, p):
        seg = self.rng.choice(self._member_segments(p))
        t = self.tick()
        patch = {"segmentMembership": {"ups": {seg: None}}}
        self.emit(p, "exit_entry_vanished_merge", "merge", patch, t, ("exported", "segment"))

    def exit_with_attribute_change(self, p):
        segs = self._member_segments(p)

        def mutate(new, t):
            for s in segs:
                ups(new)[s] = {"status": "exited", "lastQualificationTime": ts_text(t)}
            new["person"]["name"]["firstName"] = self.rng.choice(
                [f for f in FIRST_NAMES if f != new["person"]["name"]["firstName"]])

        self.change(p, "exit_with_attribute_change", mutate, ("exported", "segment"))

    def exact_resend(self, p):
        if p.last_line is None:
            return False
        # The same line again: same timestamp (equal is not stale), same content.
        self.record(p, "exact_resend", copy.deepcopy(p.last_line), ("unchanged", None))

    def same_profile_later_timestamp(self, p):
        self.emit(p, "same_profile_later_timestamp", "upsert", copy.deepcopy(p.stored), self.tick(),
                  ("unchanged", None))

    def stale(self, p):
        """An older version arriving late; it would export if it were new: ignored, counted."""
        if p.stored_ts is None:
            return False
        stored = datetime.strptime(p.stored_ts, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)
        t = stored - timedelta(seconds=self.rng.randint(1, min(900, int((stored - START).total_seconds()))))
        self.tick()
        roll = self.rng.random()
        if roll < 0.15:
            self.emit(p, "stale", "delete", None, t, ("stale", None))
            return
        new = copy.deepcopy(p.stored)
        if member_of_any(new):
            for s in self._member_segments(p):
                ups(new)[s] = {"status": "exited", "lastQualificationTime": ts_text(t)}
        else:
            ups(new)[SEG_A] = {"status": "realized", "lastQualificationTime": ts_text(t)}
        new["person"]["name"]["firstName"] = "Stale"
        op = "merge" if roll < 0.4 else "upsert"
        body = make_patch(p.stored, new) if op == "merge" else new
        self.emit(p, "stale", op, body, t, ("stale", None))

    def delete_member(self, p):
        self.emit(p, "delete_member", "delete", None, self.tick(), ("deleted", "delete"))

    def delete_nonmember(self, p):
        self.emit(p, "delete_nonmember", "delete", None, self.tick(), ("deleted", None))

    def nonmember_mapped_attribute_change(self, p):
        def mutate(new, t):
            new["person"]["name"]["firstName"] = self.rng.choice(
                [f for f in FIRST_NAMES if f != new["person"]["name"]["firstName"]])
            new["personalEmail"]["address"] = f"customer{p.n:06d}.{self.rng.randrange(1000, 9999)}@example.org"

        self.change(p, "nonmember_mapped_attribute_change", mutate, ("unchanged", None))

    def nonmember_identity_change(self, p):
        def mutate(new, t):
            new["identityMap"]["ecid"] = [{"id": self.b.ecid(), "authenticatedState": "ambiguous", "primary": True}]

        self.change(p, "nonmember_identity_change", mutate, ("unchanged", None))

    def exited_entry_refreshed(self, p):
        exited = [s for s in MAPPED_SEGMENTS if ups(p.stored).get(s, {}).get("status") == "exited"]
        if not exited:
            return False

        def mutate(new, t):
            ups(new)[exited[0]]["lastQualificationTime"] = ts_text(t)

        self.change(p, "exited_entry_refreshed", mutate, ("unchanged", None))

    def exited_entry_removed(self, p):
        """An `exited` entry vanishing is no exit: it was no membership."""
        exited = [s for s in MAPPED_SEGMENTS if ups(p.stored).get(s, {}).get("status") == "exited"]
        if not exited:
            return False

        def mutate(new, t):
            del ups(new)[exited[0]]

        self.change(p, "exited_entry_removed", mutate, ("unchanged", None))

    def qualifies_later(self, p):
        seg = self.rng.choice(MAPPED_SEGMENTS)

        def mutate(new, t):
            ups(new)[seg] = {"status": "realized", "lastQualificationTime": ts_text(t)}

        self.change(p, "qualifies_later", mutate, ("exported", "segment"))

    def recreate(self, p):
        """A deleted profile comes back (new versions only): qualifying, as on first sight."""
        t = self.tick()
        profile = self.b.profile(p.n, t)
        ups(profile)[SEG_A] = {"status": "realized", "lastQualificationTime": ts_text(t)}
        self.emit(p, "recreated_after_delete", "upsert", profile, t, ("exported", "segment"))


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(here, "sample-updates.ndjson"))
    parser.add_argument("--expected")
    parser.add_argument("--examples")
    args = parser.parse_args()

    rng = random.Random(SEED)
    gen = Generator(rng, Builder(rng, load_examples(args.examples)))
    profiles = [Profile(n) for n in range(1, PROFILES + 1)]
    for p in profiles:
        p.remaining = rng.choices([0, 1, 2, 3, 4, 5, 6], [6, 16, 24, 22, 15, 10, 7])[0]

    # Interleave: every profile's first sight comes early, follow-ups are spread over the hour.
    pending_first = profiles[:]
    rng.shuffle(pending_first)
    active = []
    while pending_first or active:
        if pending_first and (not active or rng.random() < 0.35):
            p = pending_first.pop()
            gen.first(p)
            if p.remaining:
                active.append(p)
            continue
        p = rng.choice(active)
        gen.follow_up(p)
        p.remaining -= 1
        if p.remaining == 0:
            active.remove(p)

    with open(args.out, "w", encoding="utf-8", newline="\n") as f:
        for line in gen.lines:
            f.write(line + "\n")
    if args.expected:
        with open(args.expected, "w", encoding="utf-8", newline="\n") as f:
            for e in gen.expected:
                f.write(json.dumps(e, ensure_ascii=False) + "\n")

    # Every kind of the brief must be there.
    for kind in ["first_sight_qualifying", "exit_status_exited", "exit_entry_vanished_upsert",
                 "exit_entry_vanished_merge", "identity_added", "identity_removed", "identity_reorder",
                 "mapped_attribute_change", "unmapped_attribute_change", "exact_resend", "realized_to_existing",
                 "unmapped_segment_change", "first_sight_no_segments", "stale", "delete_member",
                 "delete_nonmember", "qualifies_later"]:
        assert gen.kinds[kind] >= 3, kind
    assert len(gen.lines) >= 1200

    out = sys.stdout
    print(f"wrote {len(gen.lines)} updates for {PROFILES} profiles to {os.path.relpath(args.out)}", file=out)
    print("\nupdates by kind (expected result):", file=out)
    intended = {}
    for e in gen.expected:
        intended.setdefault(e["kind"], Counter())[(e["result"], e["reason"])] += 1
    for kind, count in sorted(gen.kinds.items(), key=lambda kv: (-kv[1], kv[0])):
        outcome = ", ".join(f"{r}{'/' + why if why else ''}" for (r, why) in intended[kind])
        print(f"  {count:5d}  {kind:38s} {outcome}", file=out)
    print("\nupdates by op: " + ", ".join(f"{op} {n}" for op, n in sorted(gen.ops.items())), file=out)
    exports = Counter(reason for (result, reason) in gen.results.elements() if reason)
    print("expected exports: " + str(sum(exports.values())) + " ("
          + ", ".join(f"{r} {exports[r]}" for r in ["segment", "identity", "attribute", "delete"]) + ")", file=out)
    by_result = Counter()
    for (result, _), n in gen.results.items():
        by_result[result] += n
    print("expected /v1/updates counts for the whole file: "
          + json.dumps({"accepted": len(gen.lines),
                        "exports": sum(exports.values()),
                        "unchanged": by_result["unchanged"],
                        "stale": by_result["stale"],
                        "deleted": by_result["deleted"]}), file=out)


if __name__ == "__main__":
    main()
