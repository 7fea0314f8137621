package config

// healthOptions are the flags of the health capability (group GroupHealth).
func healthOptions() []Option {
	return nil
}
