//! `[fleet.sqs]`: an SQS queue's backlog as a [`SignalSource`], read with
//! one `GetQueueAttributes` call per reconcile pass. The backlog is the
//! visible messages plus those in flight (received and not yet deleted):
//! counting only the visible ones would read a queue whose every message
//! is being worked on as empty and let the fleet scale in under its own
//! consumers.

use async_trait::async_trait;
use aws_config::retry::RetryConfig;
use aws_config::{BehaviorVersion, Region};
use aws_sdk_sqs::types::QueueAttributeName;
use gru_cloud::aws::{SqsSettingsError, SqsSignalConfig};
use gru_cloud::{CloudError, SignalSource};

use crate::DEFAULT_MAX_ATTEMPTS;

/// The attributes summed, visible first.
const ATTRIBUTES: [QueueAttributeName; 2] = [
    QueueAttributeName::ApproximateNumberOfMessages,
    QueueAttributeName::ApproximateNumberOfMessagesNotVisible,
];

/// One queue's backlog.
#[derive(Clone, Debug)]
pub struct SqsSignal {
    client: aws_sdk_sqs::Client,
    queue_url: String,
}

impl SqsSignal {
    /// A signal that reads `queue_url` through `client`. Does no I/O.
    pub fn from_client(client: aws_sdk_sqs::Client, queue_url: impl Into<String>) -> Self {
        SqsSignal {
            client,
            queue_url: queue_url.into(),
        }
    }

    /// Builds the client from the default credential chain, as
    /// [`crate::connect`] does for a fleet. Makes no AWS call.
    pub async fn connect(config: &SqsSignalConfig) -> Result<Self, SqsSettingsError> {
        let region = config.validate()?;
        let mut loader = aws_config::defaults(BehaviorVersion::latest())
            .http_client(crate::config::https_client())
            .region(Region::new(region))
            .retry_config(RetryConfig::standard().with_max_attempts(DEFAULT_MAX_ATTEMPTS));
        if let Some(url) = &config.endpoint_url {
            loader = loader.endpoint_url(url);
        }
        let sdk = loader.load().await;
        Ok(SqsSignal::from_client(
            aws_sdk_sqs::Client::new(&sdk),
            config.queue_url.clone(),
        ))
    }
}

#[async_trait]
impl SignalSource for SqsSignal {
    fn name(&self) -> &str {
        "sqs"
    }

    async fn read(&self) -> Result<u64, CloudError> {
        const CALL: &str = "GetQueueAttributes";
        let out = self
            .client
            .get_queue_attributes()
            .queue_url(&self.queue_url)
            .set_attribute_names(Some(ATTRIBUTES.to_vec()))
            .send()
            .await
            .map_err(|e| crate::error::provider(CALL, &e))?;
        let attributes = out.attributes();
        let mut total = 0u64;
        for name in ATTRIBUTES {
            let value =
                attributes
                    .and_then(|a| a.get(&name))
                    .ok_or_else(|| CloudError::Provider {
                        call: CALL,
                        message: format!(
                            "no {} in the answer for {}",
                            name.as_str(),
                            self.queue_url
                        ),
                    })?;
            let n: u64 = value.trim().parse().map_err(|_| CloudError::Provider {
                call: CALL,
                message: format!(
                    "{} of {} is {value:?}, not a count",
                    name.as_str(),
                    self.queue_url
                ),
            })?;
            total = total.saturating_add(n);
        }
        Ok(total)
    }
}
