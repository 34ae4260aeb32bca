//! Delivery worker (placeholder until written).
/// Placeholder.
#[derive(Debug)]
pub struct DeliveryWorker;
/// Placeholder.
#[derive(Debug)]
pub struct WorkerConfig;
/// Placeholder.
#[derive(Debug)]
pub struct WorkerHandle;
