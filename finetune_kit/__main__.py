from finetune_kit.cli import main

main()
