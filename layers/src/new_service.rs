//! `NewService`: build one service per target, and the small helpers stacks are made of.
//!
//! A [`NewService<T>`] is a synchronous, infallible factory: given a target (a plain
//! typed value such as [`Logical`](crate::target::Logical) or
//! [`Endpoint`](crate::target::Endpoint)) it returns the service for that target.
//! Anything that can fail or must wait (connecting, discovery) happens inside the
//! service it returns, where readiness and errors have a place to go. Layers wrap
//! `NewService`s exactly as they wrap `Service`s (`tower_layer::Layer`), so a stack
//! level reads as a list of layers around a factory.
//!
//! Targets expose what a layer needs through [`Param<P>`]: a layer states
//! `T: Param<SocketAddr>` instead of naming a concrete target type.

use std::sync::Arc;
use tower_layer::Layer;

/// Builds a service for each target.
pub trait NewService<T> {
    /// The service built for a target.
    type Service;

    /// Builds the service for `target`. Must not block and cannot fail: failures
    /// belong to the service's readiness or responses.
    fn new_service(&self, target: T) -> Self::Service;
}

/// A target's parameter of type `P`, read by layers that need it.
pub trait Param<P> {
    /// Returns the parameter.
    fn param(&self) -> P;
}

/// A `NewService` from a closure.
#[derive(Clone, Copy, Debug)]
pub struct NewServiceFn<F>(F);

impl<F> NewServiceFn<F> {
    /// Wraps `f`, called once per target.
    pub fn new(f: F) -> Self {
        Self(f)
    }
}

impl<T, S, F: Fn(T) -> S> NewService<T> for NewServiceFn<F> {
    type Service = S;
    fn new_service(&self, target: T) -> S {
        (self.0)(target)
    }
}

/// A `NewService` that hands every target a clone of one service.
#[derive(Clone, Debug)]
pub struct NewCloneService<S>(S);

impl<S> NewCloneService<S> {
    /// Clones `service` for every target.
    pub fn new(service: S) -> Self {
        Self(service)
    }
}

impl<T, S: Clone> NewService<T> for NewCloneService<S> {
    type Service = S;
    fn new_service(&self, _: T) -> S {
        self.0.clone()
    }
}

/// Maps targets before they reach the inner `NewService`.
#[derive(Clone, Debug)]
pub struct MapTarget<F, N> {
    f: F,
    inner: N,
}

impl<T, U, F: Fn(T) -> U, N: NewService<U>> NewService<T> for MapTarget<F, N> {
    type Service = N::Service;
    fn new_service(&self, target: T) -> N::Service {
        self.inner.new_service((self.f)(target))
    }
}

/// Layer for [`MapTarget`].
#[derive(Clone, Debug)]
pub struct MapTargetLayer<F>(F);

impl<F> MapTargetLayer<F> {
    /// A layer applying `f` to each target.
    pub fn new(f: F) -> Self {
        Self(f)
    }
}

impl<F: Clone, N> Layer<N> for MapTargetLayer<F> {
    type Service = MapTarget<F, N>;
    fn layer(&self, inner: N) -> Self::Service {
        MapTarget {
            f: self.0.clone(),
            inner,
        }
    }
}

/// Applies a `Service` layer to every service a `NewService` builds (the way a
/// per-target middleware is added to a factory).
#[derive(Clone, Debug)]
pub struct OnService<L, N> {
    layer: L,
    inner: N,
}

impl<T, L: Layer<N::Service>, N: NewService<T>> NewService<T> for OnService<L, N> {
    type Service = L::Service;
    fn new_service(&self, target: T) -> L::Service {
        self.layer.layer(self.inner.new_service(target))
    }
}

/// Layer for [`OnService`].
#[derive(Clone, Debug)]
pub struct OnServiceLayer<L>(L);

impl<L> OnServiceLayer<L> {
    /// Applies `layer` to each built service.
    pub fn new(layer: L) -> Self {
        Self(layer)
    }
}

impl<L: Clone, N> Layer<N> for OnServiceLayer<L> {
    type Service = OnService<L, N>;
    fn layer(&self, inner: N) -> Self::Service {
        OnService {
            layer: self.0.clone(),
            inner,
        }
    }
}

/// A shared, type-erased `NewService` (boxing at a stack boundary).
pub struct ArcNewService<T, S>(Arc<dyn NewService<T, Service = S> + Send + Sync>);

impl<T, S> ArcNewService<T, S> {
    /// Erases the type of `inner`.
    pub fn new<N>(inner: N) -> Self
    where
        N: NewService<T, Service = S> + Send + Sync + 'static,
    {
        Self(Arc::new(inner))
    }
}

impl<T, S> Clone for ArcNewService<T, S> {
    fn clone(&self) -> Self {
        Self(self.0.clone())
    }
}

impl<T, S> std::fmt::Debug for ArcNewService<T, S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ArcNewService")
    }
}

impl<T, S> NewService<T> for ArcNewService<T, S> {
    type Service = S;
    fn new_service(&self, target: T) -> S {
        self.0.new_service(target)
    }
}

/// A builder that reads top-down as the order data flows *out*: each `push` wraps what
/// is there so far, so the last layer pushed is the outermost.
#[derive(Clone, Debug)]
pub struct Stack<S>(S);

impl<S> Stack<S> {
    /// Starts a stack from its innermost service or factory.
    pub fn new(inner: S) -> Self {
        Self(inner)
    }

    /// Wraps the stack in `layer`.
    pub fn push<L: Layer<S>>(self, layer: L) -> Stack<L::Service> {
        Stack(layer.layer(self.0))
    }

    /// Wraps every service the (factory) stack builds in `layer`.
    pub fn push_on_service<L: Clone>(self, layer: L) -> Stack<OnService<L, S>> {
        self.push(OnServiceLayer::new(layer))
    }

    /// Maps targets before they reach the stack.
    pub fn push_map_target<F: Clone>(self, f: F) -> Stack<MapTarget<F, S>> {
        self.push(MapTargetLayer::new(f))
    }

    /// Erases the factory's type.
    pub fn arc_new_service<T>(self) -> Stack<ArcNewService<T, S::Service>>
    where
        S: NewService<T> + Send + Sync + 'static,
    {
        Stack(ArcNewService::new(self.0))
    }

    /// Returns the built stack.
    pub fn into_inner(self) -> S {
        self.0
    }
}

impl<T, S: NewService<T>> NewService<T> for Stack<S> {
    type Service = S::Service;
    fn new_service(&self, target: T) -> S::Service {
        self.0.new_service(target)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower::util::MapRequestLayer;

    #[test]
    fn stack_applies_layers_in_order() {
        // A factory that builds a "service" remembering its target, mapped twice.
        let stack = Stack::new(NewServiceFn::new(|t: String| t))
            .push_map_target(|n: u32| format!("<{n}>"))
            .push_map_target(|n: u8| u32::from(n) * 10)
            .arc_new_service::<u8>()
            .into_inner();
        assert_eq!(stack.new_service(4), "<40>");
        assert_eq!(stack.clone().new_service(1), "<10>");
    }

    #[tokio::test]
    async fn on_service_wraps_each_built_service() {
        use tower::{service_fn, ServiceExt};
        let stack = Stack::new(NewServiceFn::new(|add: u32| {
            service_fn(move |x: u32| async move { Ok::<_, std::convert::Infallible>(x + add) })
        }))
        .push_on_service(MapRequestLayer::new(|x: u32| x * 2));
        let svc = stack.new_service(1);
        assert_eq!(svc.oneshot(5).await.unwrap(), 11);
        let clone = NewCloneService::new(7u8);
        assert_eq!(NewService::<()>::new_service(&clone, ()), 7);
    }
}
