from owl2.cli.main import main

raise SystemExit(main())
