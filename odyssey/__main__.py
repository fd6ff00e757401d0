from odyssey.cli import main

raise SystemExit(main())
