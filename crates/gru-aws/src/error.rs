//! SDK errors to [`CloudError`]. The three SDK crates share one error type
//! (`aws_smithy_runtime_api`'s `SdkError`), so one function serves them all.

use std::error::Error;
use std::fmt::Debug;

use aws_sdk_autoscaling::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use gru_cloud::CloudError;

/// `CloudError::Provider` for a failed call: `CODE: message` when AWS
/// answered with an error, the whole error chain otherwise (timeouts,
/// connection failures, unparseable answers).
pub(crate) fn provider<E, R>(call: &'static str, err: &SdkError<E, R>) -> CloudError
where
    E: ProvideErrorMetadata + Error + 'static,
    R: Debug,
{
    let message = match (err.code(), err.message()) {
        (Some(code), Some(message)) => format!("{code}: {message}"),
        (Some(code), None) => code.to_owned(),
        _ => DisplayErrorContext(err).to_string(),
    };
    CloudError::Provider { call, message }
}

/// The AWS error code of a failed call, if AWS answered at all.
pub(crate) fn code<E, R>(err: &SdkError<E, R>) -> Option<&str>
where
    E: ProvideErrorMetadata,
{
    err.code()
}

/// True when AWS certainly did not apply the request: the request was never
/// built, or AWS refused it with a client error (4xx: validation,
/// throttling, access denied). A timeout, a lost answer or a server error
/// (5xx) may hide a request that AWS did apply.
pub(crate) fn certainly_not_applied<E>(err: &SdkError<E>) -> bool {
    match err {
        SdkError::ConstructionFailure(_) => true,
        SdkError::ServiceError(e) => e.raw().status().is_client_error(),
        _ => false,
    }
}
