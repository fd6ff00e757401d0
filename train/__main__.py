from train.launch import main

raise SystemExit(main())
