from stopkit.cli import main

raise SystemExit(main())
