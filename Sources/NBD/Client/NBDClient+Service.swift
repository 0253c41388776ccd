import ServiceLifecycle

/// An `NBDClient` is a swift-service-lifecycle `Service`: put it in a `ServiceGroup` beside
/// the services that use it. On a graceful shutdown (SIGTERM, say) it takes no more requests,
/// lets those on the wire be answered, flushes the writes its replay log holds (after a
/// reconnection, if one is under way), and disconnects politely; cancelling the group ends it
/// at once. ``NBDClient/run()`` is the service's run.
extension NBDClient: Service {}
