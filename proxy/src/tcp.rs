//! The tcp edge: a byte relay in both directions.

use std::sync::Arc;

use tokio::net::TcpListener;

use crate::edge::EdgeCtx;

pub(crate) async fn serve(listener: TcpListener, ctx: Arc<EdgeCtx>) {
    let _ = (listener, ctx);
}
