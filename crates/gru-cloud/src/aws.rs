//! A fleet's AWS settings as plain values: what the controller's config
//! says about an Auto Scaling group and its target group, checked without
//! any AWS call. gru-aws turns them into clients; the controller parses its
//! TOML into them without knowing the SDK.

/// Attempts per AWS call (the first one included) when the config names
/// none: the SDK's standard retry mode, which backs off on throttling and 5xx.
pub const DEFAULT_MAX_ATTEMPTS: u32 = 3;

/// What the controller's config says about one fleet on AWS. Plain values:
/// the controller parses its TOML into this; gru-aws connects with it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AwsFleetConfig {
    /// The region of the group and the target group. `None`: the region in
    /// the target group's ARN.
    pub region: Option<String>,
    /// The Auto Scaling group's name.
    pub group_name: String,
    /// The ELBv2 target group the fleet's engines are registered in.
    pub target_group_arn: String,
    /// Another endpoint for every service, for emulators such as moto.
    /// `None` in production.
    pub endpoint_url: Option<String>,
    /// The group's launching lifecycle hook (instances wait in
    /// `Pending:Wait` until the controller completes the action), if any.
    pub launching_hook: Option<String>,
    /// The group's terminating lifecycle hook (instances wait in
    /// `Terminating:Wait`), if any.
    pub terminating_hook: Option<String>,
    /// Attempts per AWS call, the first included (1 disables retries).
    /// `TerminateInstanceInAutoScalingGroup` is never retried by the SDK.
    pub max_attempts: u32,
}

impl AwsFleetConfig {
    /// A config with no hooks, the ARN's region and the default retries.
    pub fn new(group_name: impl Into<String>, target_group_arn: impl Into<String>) -> Self {
        AwsFleetConfig {
            region: None,
            group_name: group_name.into(),
            target_group_arn: target_group_arn.into(),
            endpoint_url: None,
            launching_hook: None,
            terminating_hook: None,
            max_attempts: DEFAULT_MAX_ATTEMPTS,
        }
    }

    /// Checks the values and returns the region to use.
    pub fn validate(&self) -> Result<String, AwsSettingsError> {
        if self.group_name.trim().is_empty() {
            return Err(AwsSettingsError::EmptyGroupName);
        }
        if self.max_attempts == 0 {
            return Err(AwsSettingsError::NoAttempts);
        }
        for (hook, name) in [
            ("launching_hook", &self.launching_hook),
            ("terminating_hook", &self.terminating_hook),
        ] {
            if name.as_deref().is_some_and(|n| n.trim().is_empty()) {
                return Err(AwsSettingsError::EmptyHookName { hook });
            }
        }
        let arn_region = target_group_region(&self.target_group_arn).ok_or_else(|| {
            AwsSettingsError::NotATargetGroupArn {
                arn: self.target_group_arn.clone(),
            }
        })?;
        match &self.region {
            Some(region) if region != arn_region => Err(AwsSettingsError::RegionMismatch {
                region: region.clone(),
                arn: self.target_group_arn.clone(),
            }),
            Some(region) => Ok(region.clone()),
            None => Ok(arn_region.to_owned()),
        }
    }
}

/// The region of an ELBv2 target group ARN:
/// `arn:PARTITION:elasticloadbalancing:REGION:ACCOUNT:targetgroup/NAME/ID`.
fn target_group_region(arn: &str) -> Option<&str> {
    let mut parts = arn.splitn(6, ':');
    let (
        Some("arn"),
        Some(_partition),
        Some("elasticloadbalancing"),
        Some(region),
        Some(_),
        Some(resource),
    ) = (
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
    )
    else {
        return None;
    };
    (!region.is_empty() && resource.starts_with("targetgroup/")).then_some(region)
}

/// `[fleet.sqs]`: an SQS queue whose backlog sizes the fleet. Plain values,
/// like [`AwsFleetConfig`]. Its errors ([`SqsSettingsError`]) name what
/// is expected; [`SqsSettingsError::key`] names the key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SqsSignalConfig {
    /// `https://sqs.REGION.amazonaws.com/ACCOUNT/NAME`.
    pub queue_url: String,
    /// `None`: the region in an AWS queue URL (required for others, such as
    /// an emulator's).
    pub region: Option<String>,
    /// Another endpoint, for emulators such as moto. `None` in production.
    pub endpoint_url: Option<String>,
    /// Messages (visible plus in flight) one minion should take.
    pub target_per_minion: u32,
    /// A fleet at zero wakes only when the backlog is above this.
    pub activation: u64,
}

impl SqsSignalConfig {
    /// Checks the values and returns the region to use.
    pub fn validate(&self) -> Result<String, SqsSettingsError> {
        let url = self.queue_url.trim();
        let Some(rest) = url
            .strip_prefix("https://")
            .or_else(|| url.strip_prefix("http://"))
        else {
            return Err(SqsSettingsError::NotAQueueUrl {
                url: self.queue_url.clone(),
            });
        };
        let mut parts = rest.split('/');
        let (Some(host), Some(account), Some(name)) = (parts.next(), parts.next(), parts.next())
        else {
            return Err(SqsSettingsError::NotAQueueUrl {
                url: self.queue_url.clone(),
            });
        };
        if host.is_empty() || account.is_empty() || name.is_empty() {
            return Err(SqsSettingsError::NotAQueueUrl {
                url: self.queue_url.clone(),
            });
        }
        if self.target_per_minion == 0 {
            return Err(SqsSettingsError::ZeroTarget);
        }
        // sqs.REGION.amazonaws.com (or .amazonaws.com.cn).
        let url_region = host
            .strip_prefix("sqs.")
            .and_then(|h| h.split_once(".amazonaws.com"))
            .map(|(region, _)| region)
            .filter(|r| !r.is_empty() && !r.contains('.'));
        match (&self.region, url_region) {
            (Some(region), Some(r)) if region != r => Err(SqsSettingsError::RegionMismatch {
                region: region.clone(),
                url: self.queue_url.clone(),
            }),
            (Some(region), _) => Ok(region.clone()),
            (None, Some(r)) => Ok(r.to_owned()),
            (None, None) => Err(SqsSettingsError::NoRegion {
                url: self.queue_url.clone(),
            }),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SqsSettingsError {
    #[error("{url:?} is not an SQS queue URL (https://sqs.REGION.amazonaws.com/ACCOUNT/NAME)")]
    NotAQueueUrl { url: String },
    #[error("at least 1")]
    ZeroTarget,
    #[error("{region:?} differs from the region of queue {url}")]
    RegionMismatch { region: String, url: String },
    #[error("needed: the queue URL {url:?} does not name a region")]
    NoRegion { url: String },
}

impl SqsSettingsError {
    /// The `[fleet.sqs]` key at fault.
    pub fn key(&self) -> &'static str {
        match self {
            SqsSettingsError::NotAQueueUrl { .. } => "queue_url",
            SqsSettingsError::ZeroTarget => "target_per_minion",
            SqsSettingsError::RegionMismatch { .. } | SqsSettingsError::NoRegion { .. } => "region",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AwsSettingsError {
    #[error("group_name must not be empty")]
    EmptyGroupName,
    #[error("{hook} must not be empty when set")]
    EmptyHookName { hook: &'static str },
    #[error("max_attempts must be at least 1")]
    NoAttempts,
    #[error(
        "target_group_arn {arn:?} is not an ELBv2 target group ARN (arn:aws:elasticloadbalancing:REGION:ACCOUNT:targetgroup/NAME/ID)"
    )]
    NotATargetGroupArn { arn: String },
    #[error("region {region:?} differs from the region of target group {arn}")]
    RegionMismatch { region: String, arn: String },
}

#[cfg(test)]
mod tests {
    use super::*;

    const ARN: &str =
        "arn:aws:elasticloadbalancing:eu-west-1:123456789012:targetgroup/hl7/0123456789abcdef";

    fn sqs(url: &str, region: Option<&str>) -> SqsSignalConfig {
        SqsSignalConfig {
            queue_url: url.to_owned(),
            region: region.map(str::to_owned),
            endpoint_url: None,
            target_per_minion: 100,
            activation: 0,
        }
    }

    #[test]
    fn an_sqs_queue_url_names_its_region_or_the_config_must() {
        let url = "https://sqs.eu-west-1.amazonaws.com/123456789012/hl7-inbound";
        assert_eq!(sqs(url, None).validate().unwrap(), "eu-west-1");
        assert_eq!(sqs(url, Some("eu-west-1")).validate().unwrap(), "eu-west-1");
        let e = sqs(url, Some("us-east-1")).validate().unwrap_err();
        assert_eq!(e.key(), "region");
        let moto = "http://127.0.0.1:5000/123456789012/hl7-inbound";
        let e = sqs(moto, None).validate().unwrap_err();
        assert_eq!(
            e.to_string(),
            "needed: the queue URL \"http://127.0.0.1:5000/123456789012/hl7-inbound\" does not name a region"
        );
        assert_eq!(
            sqs(moto, Some("us-east-1")).validate().unwrap(),
            "us-east-1"
        );
        let e = sqs("hl7-inbound", Some("us-east-1"))
            .validate()
            .unwrap_err();
        assert_eq!(e.key(), "queue_url");
        let mut zero = sqs(url, None);
        zero.target_per_minion = 0;
        assert_eq!(zero.validate().unwrap_err().key(), "target_per_minion");
    }

    #[test]
    fn the_region_defaults_to_the_target_groups() {
        assert_eq!(
            AwsFleetConfig::new("g", ARN).validate().unwrap(),
            "eu-west-1"
        );
    }

    #[test]
    fn a_region_that_contradicts_the_arn_is_refused() {
        let mut c = AwsFleetConfig::new("g", ARN);
        c.region = Some("us-east-1".into());
        assert!(matches!(
            c.validate(),
            Err(AwsSettingsError::RegionMismatch { .. })
        ));
        c.region = Some("eu-west-1".into());
        assert_eq!(c.validate().unwrap(), "eu-west-1");
    }

    #[test]
    fn bad_values_are_named() {
        for arn in [
            "",
            "arn:aws:elasticloadbalancing:eu-west-1:123456789012:loadbalancer/net/x/1",
            "arn:aws:autoscaling:eu-west-1:123456789012:targetgroup/x/1",
            "arn:aws:elasticloadbalancing::123456789012:targetgroup/x/1",
        ] {
            let err = AwsFleetConfig::new("g", arn).validate().unwrap_err();
            assert!(
                matches!(err, AwsSettingsError::NotATargetGroupArn { .. }),
                "{arn}"
            );
        }
        assert!(matches!(
            AwsFleetConfig::new(" ", ARN).validate(),
            Err(AwsSettingsError::EmptyGroupName)
        ));
        let mut c = AwsFleetConfig::new("g", ARN);
        c.max_attempts = 0;
        assert!(matches!(c.validate(), Err(AwsSettingsError::NoAttempts)));
        c.max_attempts = 1;
        c.terminating_hook = Some(String::new());
        assert!(matches!(
            c.validate(),
            Err(AwsSettingsError::EmptyHookName {
                hook: "terminating_hook"
            })
        ));
    }
}
