//! [`connect`]: a fleet's AWS settings ([`AwsFleetConfig`], plain values
//! defined in gru-cloud) into an [`AwsFleet`] with the SDK's default
//! credential chain.

use aws_config::retry::RetryConfig;
use aws_config::{BehaviorVersion, Region};
use aws_smithy_http_client::tls;

use crate::{AwsClients, AwsFleet, AwsFleetConfig, ConnectError};

/// The SDK's HTTPS client: hyper on rustls with ring, the TLS stack gRPC
/// uses too (the SDK's default would add aws-lc-rs), trusting the system's
/// roots.
pub fn https_client() -> aws_sdk_ec2::config::SharedHttpClient {
    aws_smithy_http_client::Builder::new()
        .tls_provider(tls::Provider::Rustls(
            tls::rustls_provider::CryptoMode::Ring,
        ))
        .build_https()
}

/// Builds the fleet's SDK clients from the default credential chain
/// (environment, shared config and credentials files, web identity, ECS,
/// the instance role through IMDS). Makes no AWS call: a wrong group name or
/// missing permission shows on the first `describe`.
pub async fn connect(config: AwsFleetConfig) -> Result<AwsFleet, ConnectError> {
    let region = config.validate()?;
    let mut loader = aws_config::defaults(BehaviorVersion::latest())
        .http_client(https_client())
        .region(Region::new(region))
        .retry_config(RetryConfig::standard().with_max_attempts(config.max_attempts));
    if let Some(url) = &config.endpoint_url {
        loader = loader.endpoint_url(url);
    }
    let sdk = loader.load().await;
    let clients = AwsClients {
        autoscaling: aws_sdk_autoscaling::Client::new(&sdk),
        elb: aws_sdk_elasticloadbalancingv2::Client::new(&sdk),
        ec2: aws_sdk_ec2::Client::new(&sdk),
    };
    Ok(AwsFleet::from_clients(config, clients))
}
