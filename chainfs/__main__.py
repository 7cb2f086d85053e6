from chainfs.cli.main import main

raise SystemExit(main())
