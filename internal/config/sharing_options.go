package config

// sharingOptions are the flags of the sharing capability (group GroupSharing).
func sharingOptions() []Option {
	return nil
}
