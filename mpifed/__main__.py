from mpifed.cli.main import main

raise SystemExit(main())
