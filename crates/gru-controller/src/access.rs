//! Who may do what through `AdminService`.
//!
//! An admin's role comes from the subject of the client certificate the TLS
//! layer verified, by the `[access]` rules of the controller's config (the
//! first rule that matches wins, then `default_role`). Without an `[access]`
//! table the rules are [`Access::default`]'s: a certificate whose
//! organisational unit is `gru-viewer`, `gru-operator` or `gru-admin` has
//! that role, which is what `gru dev` and `gru cert issue` write; any other
//! certificate, though signed by the CA, has none. A minion's certificate
//! (a `gru://` URI in its subject alternative names) never has a role.
//!
//! Each call needs the least role of [`CALLS`]; roles are ordered, so an
//! operator may do what a viewer may.

use std::fmt;

/// What an admin may do: each role may do everything the one before it may.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Role {
    /// List, get, explain and follow events.
    Viewer,
    /// A viewer who may also scale, drain, pause and resume.
    Operator,
    /// An operator who may also change trust (forget a minion).
    Admin,
}

impl Role {
    pub const ALL: [Role; 3] = [Role::Viewer, Role::Operator, Role::Admin];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
            Role::Admin => "admin",
        }
    }

    pub fn parse(s: &str) -> Option<Role> {
        Role::ALL.into_iter().find(|r| r.as_str() == s)
    }

    /// The organisational unit (OU) of the certificates gru issues for this
    /// role, which the default rules map back to it.
    pub fn organizational_unit(self) -> &'static str {
        match self {
            Role::Viewer => "gru-viewer",
            Role::Operator => "gru-operator",
            Role::Admin => "gru-admin",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Every admin call and the least role it needs. `WhoAmI` needs none: any
/// certificate the CA signed may ask what it may do.
pub const CALLS: &[(&str, Role)] = &[
    ("ListFleets", Role::Viewer),
    ("ListMinions", Role::Viewer),
    ("GetMinion", Role::Viewer),
    ("Explain", Role::Viewer),
    ("WatchEvents", Role::Viewer),
    ("ControllerStatus", Role::Viewer),
    ("Scale", Role::Operator),
    ("Drain", Role::Operator),
    ("Pause", Role::Operator),
    ("Resume", Role::Operator),
    ("ForgetMinion", Role::Admin),
];

/// The least role `call` needs.
pub fn needed(call: &str) -> Option<Role> {
    CALLS.iter().find(|(c, _)| *c == call).map(|(_, r)| *r)
}

/// The calls `role` may make.
pub fn allowed(role: Role) -> impl Iterator<Item = &'static str> {
    CALLS
        .iter()
        .filter(move |(_, need)| role >= *need)
        .map(|(c, _)| *c)
}

/// A certificate whose subject has every attribute the rule names has its
/// role. A rule names at least one attribute.
#[derive(Clone, Debug, PartialEq)]
pub struct AccessRule {
    pub common_name: Option<String>,
    pub organizational_unit: Option<String>,
    pub role: Role,
}

impl AccessRule {
    fn matches(&self, s: &Subject) -> bool {
        let has = |want: &Option<String>, got: &[String]| {
            want.as_ref().is_none_or(|w| got.iter().any(|g| g == w))
        };
        (self.common_name.is_some() || self.organizational_unit.is_some())
            && has(&self.common_name, &s.common_names)
            && has(&self.organizational_unit, &s.organizational_units)
    }
}

impl fmt::Display for AccessRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts = Vec::new();
        if let Some(cn) = &self.common_name {
            parts.push(format!("CN={cn}"));
        }
        if let Some(ou) = &self.organizational_unit {
            parts.push(format!("OU={ou}"));
        }
        write!(f, "{} -> {}", parts.join(", "), self.role)
    }
}

/// The `[access]` rules.
#[derive(Clone, Debug, PartialEq)]
pub struct Access {
    pub rules: Vec<AccessRule>,
    /// The role of a certificate no rule matches; `None` refuses it.
    pub default_role: Option<Role>,
}

impl Default for Access {
    /// The rules for the certificates gru issues: OU `gru-<role>`.
    fn default() -> Self {
        Access {
            rules: Role::ALL
                .into_iter()
                .map(|role| AccessRule {
                    common_name: None,
                    organizational_unit: Some(role.organizational_unit().to_owned()),
                    role,
                })
                .collect(),
            default_role: None,
        }
    }
}

/// What the controller knows about a caller.
#[derive(Clone, Debug, PartialEq)]
pub struct Caller {
    /// How the caller is named in events and messages: `CN=bob`, or the
    /// whole subject when it has no common name.
    pub identity: String,
    pub role: Option<Role>,
    /// Why it has that role (the rule that matched) or none.
    pub because: String,
}

impl Caller {
    /// `Ok` when the caller may make `call`, else the sentence that says
    /// which role it needs and which the caller has.
    pub fn may(&self, call: &str) -> Result<(), String> {
        let Some(need) = needed(call) else {
            return Ok(());
        };
        match self.role {
            Some(role) if role >= need => Ok(()),
            Some(role) => Err(format!(
                "{call} needs the {need} role; {} has the {role} role ({})",
                self.identity, self.because
            )),
            None => Err(format!(
                "{call} needs the {need} role; {} has no role ({})",
                self.identity, self.because
            )),
        }
    }
}

/// The parts of a certificate's subject the rules look at.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Subject {
    pub common_names: Vec<String>,
    pub organizational_units: Vec<String>,
    /// A `gru://` URI subject alternative name: a minion's certificate.
    pub minion_uri: Option<String>,
    /// The whole subject, as text.
    pub text: String,
}

impl Subject {
    /// Reads the subject of a DER certificate.
    pub fn from_der(der: &[u8]) -> Result<Subject, String> {
        let (_, cert) = x509_parser::parse_x509_certificate(der)
            .map_err(|e| format!("the client certificate does not parse: {e}"))?;
        let name = cert.subject();
        let strings = |it: &mut dyn Iterator<Item = &x509_parser::x509::AttributeTypeAndValue>| {
            it.filter_map(|a| a.as_str().ok().map(str::to_owned))
                .collect::<Vec<_>>()
        };
        let minion_uri = cert
            .subject_alternative_name()
            .ok()
            .flatten()
            .and_then(|san| {
                san.value.general_names.iter().find_map(|n| match n {
                    x509_parser::extensions::GeneralName::URI(u) if u.starts_with("gru://") => {
                        Some((*u).to_owned())
                    }
                    _ => None,
                })
            });
        Ok(Subject {
            common_names: strings(&mut name.iter_common_name()),
            organizational_units: strings(&mut name.iter_organizational_unit()),
            minion_uri,
            text: name.to_string(),
        })
    }

    /// How the caller is named: `CN=bob`, else the whole subject.
    pub fn identity(&self) -> String {
        match (&self.minion_uri, self.common_names.first()) {
            (Some(uri), _) => uri.clone(),
            (None, Some(cn)) => format!("CN={cn}"),
            (None, None) if self.text.is_empty() => "a certificate with an empty subject".into(),
            (None, None) => self.text.clone(),
        }
    }
}

impl Access {
    /// The caller a verified certificate's subject names, with its role.
    pub fn caller(&self, subject: &Subject) -> Caller {
        let identity = subject.identity();
        if subject.minion_uri.is_some() {
            return Caller {
                identity,
                role: None,
                because: "a minion's certificate has no admin role".to_owned(),
            };
        }
        if let Some(rule) = self.rules.iter().find(|r| r.matches(subject)) {
            return Caller {
                identity,
                role: Some(rule.role),
                because: format!("[access] rule {rule}"),
            };
        }
        let because = match self.default_role {
            Some(role) => {
                return Caller {
                    identity,
                    role: Some(role),
                    because: format!("no [access] rule matches; default_role = {role:?}"),
                };
            }
            None => format!(
                "no [access] rule matches its subject {:?} and there is no default_role",
                subject.text
            ),
        };
        Caller {
            identity,
            role: None,
            because,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn subject(cn: &[&str], ou: &[&str]) -> Subject {
        Subject {
            common_names: cn.iter().map(|s| s.to_string()).collect(),
            organizational_units: ou.iter().map(|s| s.to_string()).collect(),
            minion_uri: None,
            text: "test".to_owned(),
        }
    }

    #[test]
    fn the_default_rules_give_gru_issued_certificates_their_role_and_others_none() {
        let access = Access::default();
        for role in Role::ALL {
            let c = access.caller(&subject(&["bob"], &[role.organizational_unit()]));
            assert_eq!(c.role, Some(role));
            assert_eq!(c.identity, "CN=bob");
        }
        let stranger = access.caller(&subject(&["eve"], &["ops"]));
        assert_eq!(stranger.role, None);
        assert_eq!(
            stranger.may("ListFleets").unwrap_err(),
            "ListFleets needs the viewer role; CN=eve has no role (no [access] rule matches its subject \"test\" and there is no default_role)"
        );
    }

    #[test]
    fn the_first_matching_rule_wins_and_every_named_attribute_must_match() {
        let access = Access {
            rules: vec![
                AccessRule {
                    common_name: Some("alice".into()),
                    organizational_unit: Some("ops".into()),
                    role: Role::Operator,
                },
                AccessRule {
                    common_name: Some("alice".into()),
                    organizational_unit: None,
                    role: Role::Viewer,
                },
            ],
            default_role: None,
        };
        assert_eq!(
            access.caller(&subject(&["alice"], &["ops"])).role,
            Some(Role::Operator)
        );
        assert_eq!(
            access.caller(&subject(&["alice"], &["audit"])).role,
            Some(Role::Viewer)
        );
        assert_eq!(access.caller(&subject(&["bob"], &["ops"])).role, None);
        let with_default = Access {
            default_role: Some(Role::Viewer),
            ..access
        };
        assert_eq!(
            with_default.caller(&subject(&["bob"], &[])).role,
            Some(Role::Viewer)
        );
    }

    #[test]
    fn a_minion_certificate_has_no_role_whatever_the_rules_say() {
        let access = Access {
            rules: vec![],
            default_role: Some(Role::Admin),
        };
        let mut s = subject(&["i-0abc"], &["gru-admin"]);
        s.minion_uri = Some("gru://fleet/prod/instance/i-0abc".into());
        let c = access.caller(&s);
        assert_eq!(c.role, None);
        assert_eq!(c.identity, "gru://fleet/prod/instance/i-0abc");
        assert!(c.may("ListFleets").is_err());
    }

    #[test]
    fn each_role_may_do_what_the_role_before_it_may_and_says_what_is_missing() {
        let viewer = Caller {
            identity: "CN=alice".into(),
            role: Some(Role::Viewer),
            because: "[access] rule OU=gru-viewer -> viewer".into(),
        };
        assert!(viewer.may("Explain").is_ok());
        assert_eq!(
            viewer.may("Scale").unwrap_err(),
            "Scale needs the operator role; CN=alice has the viewer role ([access] rule OU=gru-viewer -> viewer)"
        );
        assert_eq!(allowed(Role::Viewer).count(), 6);
        assert_eq!(allowed(Role::Operator).count(), CALLS.len() - 1);
        assert_eq!(allowed(Role::Admin).count(), CALLS.len());
        assert!(allowed(Role::Operator).all(|c| allowed(Role::Admin).any(|a| a == c)));
        assert!(!allowed(Role::Operator).any(|c| c == "ForgetMinion"));
        assert!(viewer.may("WhoAmI").is_ok());
    }
}
