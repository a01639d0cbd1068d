module taxiway.test/egressclient

go 1.19
