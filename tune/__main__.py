from tune.sweep import main

raise SystemExit(main())
