// docs/Library.md's logging example: every option, request and reply at trace level.
// snippet.show
import Logging
import NBD

func tracedConfiguration() -> NBDClientConfiguration {
    var configuration = NBDClientConfiguration()
    configuration.logger = Logger(label: "nbd")
    configuration.logger.logLevel = .trace
    return configuration
}
