"""The text scenario: WordNet glosses on the server, fortune topics on the devices."""
