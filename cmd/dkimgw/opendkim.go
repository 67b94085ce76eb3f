package main

func runImportOpenDKIM(c *cli, args []string) int {
	return failf(c, exitUsage, "milter import-opendkim: not yet")
}
