from wsctl.cli import entry

entry()
