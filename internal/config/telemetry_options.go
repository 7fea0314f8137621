package config

// telemetryOptions are the flags of the telemetry capability (group GroupTelemetry).
func telemetryOptions() []Option {
	return nil
}
