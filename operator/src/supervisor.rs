//! Runs every kind's controller together, and stops them together.

use std::sync::Arc;

use futures::FutureExt;
use futures::channel::oneshot;

use crate::controller::Context;

/// Tells every running controller to finish its in-flight reconciles and stop.
#[derive(Default)]
pub struct Shutdown {
    senders: Vec<oneshot::Sender<()>>,
}

impl Shutdown {
    /// A trigger for one controller.
    pub fn subscribe(&mut self) -> impl Future<Output = ()> + Send + Sync + 'static + use<> {
        let (sender, receiver) = oneshot::channel();
        self.senders.push(sender);
        receiver.map(|_| ())
    }

    pub fn trigger(self) {
        for sender in self.senders {
            let _ = sender.send(());
        }
    }
}

/// Runs the controllers of all five kinds until `shutdown` is triggered.
pub fn run_all(ctx: Arc<Context>, shutdown: &mut Shutdown) -> impl Future<Output = ()> + use<> {
    let featureviews = crate::featureview::run(ctx.clone(), shutdown.subscribe());
    let trainingjobs = crate::trainingjob::run(ctx.clone(), shutdown.subscribe());
    let modelversions = crate::modelversion::run(ctx.clone(), shutdown.subscribe());
    let rollouts = crate::rollout::run(ctx.clone(), shutdown.subscribe());
    let gpuquotas = crate::gpuquota::run(ctx, shutdown.subscribe());
    async move {
        futures::join!(
            featureviews,
            trainingjobs,
            modelversions,
            rollouts,
            gpuquotas
        );
    }
}
